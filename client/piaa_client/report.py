"""The album report: one self-contained HTML page (thumbnails embedded, no network) in the spirit of
figures 5 and 6 of Ren et al. 2017: per photo the user's rating, the generic and the personalized score."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

from piaa_client.features import CONTENT_CLUSTER_NAMES, FEATURE_SPACE_VERSION
from piaa_client.types import ImageScore, Profile, Scale

THUMBNAIL_SIDE = 200
EXAMPLES_PER_CLUSTER = 4
"""Thumbnails shown per content cluster: the album's photos most surely in it."""
_BAR_COLOURS = {"rating": "#2e7d32", "generic": "#9e9e9e", "personalized": "#1565c0"}


def unit_value(value: float, scale: Scale) -> float:
    """A rating on [0, 1], the scale scores are shown on."""
    return (value - 1.0) / 4.0 if scale == "stars" else value


def thumbnail_data_uri(data: bytes) -> str:
    """A small JPEG data URI of the image; the original bytes when Pillow (optional) is not installed."""
    try:
        from PIL import Image
    except ImportError:
        mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"
    opened = Image.open(io.BytesIO(data))
    opened.draft("RGB", (THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    image = opened.convert("RGB")
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return f"data:image/jpeg;base64,{base64.b64encode(out.getvalue()).decode()}"


def _bar(kind: str, label: str, value: float | None) -> str:
    if value is None:
        return f'<div class="bar"><span class="label">{label}</span><span class="none">not rated</span></div>'
    width = max(0.0, min(1.0, value)) * 100
    return (
        f'<div class="bar"><span class="label">{label}</span>'
        f'<span class="track"><span class="fill {kind}" style="width:{width:.1f}%"></span></span>'
        f'<span class="value">{value:.2f}</span></div>'
    )


def _weight_chart(profile: Profile) -> str:
    if not profile.exists or not profile.weights:
        return "<p>No taste profile yet: rate some photos first.</p>"
    peak = max(abs(f.weight) for f in profile.weights) or 1.0
    rows = []
    for factor in sorted(profile.weights, key=lambda f: f.weight, reverse=True):
        width = abs(factor.weight) / peak * 50
        side = "pos" if factor.weight >= 0 else "neg"
        left = 50 if factor.weight >= 0 else 50 - width
        rows.append(
            f'<div class="weight"><span class="label">{html.escape(factor.name)}</span>'
            f'<span class="axis"><span class="w {side}" style="left:{left:.1f}%;width:{width:.1f}%">'
            f'</span></span><span class="value">{factor.weight:+.3f}</span></div>'
        )
    return "\n".join(rows)


def content_examples(
    ranked: Sequence[ImageScore],
    per_cluster: int = EXAMPLES_PER_CLUSTER,
    names: Sequence[str] = CONTENT_CLUSTER_NAMES,
) -> list[tuple[str, list[ImageScore]]]:
    """(cluster name, the album's photos whose most probable cluster it is, surest first, at most
    `per_cluster`) for every content cluster that holds a photo of the album, in cluster order; `names`
    are the content columns' names in the profile's feature space."""
    members: dict[int, list[ImageScore]] = {}
    for score in ranked:
        if score.error is None and len(score.content) == len(names):
            top = max(range(len(score.content)), key=score.content.__getitem__)
            members.setdefault(top, []).append(score)
    return [
        (names[k], sorted(members[k], key=lambda s: -s.content[k])[:per_cluster]) for k in sorted(members)
    ]


def content_names(profile: Profile) -> tuple[str, ...] | None:
    """The content columns' names in the profile's feature space: as its weights name them (the gateway
    names each space's own), else this package's when the space is this package's, else None."""
    named = tuple(w.name[len("content:") :] for w in profile.weights if w.name.startswith("content:"))
    if len(named) == len(CONTENT_CLUSTER_NAMES):
        return named
    return CONTENT_CLUSTER_NAMES if profile.feature_space_version in ("", FEATURE_SPACE_VERSION) else None


def _content_section(ranked: Sequence[ImageScore], images: Mapping[str, bytes], profile: Profile) -> str:
    names = content_names(profile)
    if names is None:
        return ""  # another feature space's content, which this package cannot name
    rows = []
    for name, examples in content_examples([s for s in ranked if s.id in images], names=names):
        thumbs = "".join(
            f'<img alt="{html.escape(s.id)}" title="{html.escape(s.id)}" '
            f'src="{thumbnail_data_uri(images[s.id])}">'
            for s in examples
        )
        rows.append(
            f'<div class="cluster"><span class="label">content:{html.escape(name)}</span>{thumbs}</div>'
        )
    if not rows:
        return ""
    return "<h2>Content in this album: what the content factors above refer to</h2>\n" + "\n".join(rows)


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px}
.legend span{display:inline-block;margin-right:16px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:16px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px}
.card img{width:100%;height:170px;object-fit:cover;border-radius:4px}
.name{font-size:12px;color:#555;margin:4px 0;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.bar,.weight{display:flex;align-items:center;font-size:12px;margin:2px 0}
.label{width:90px;flex:none}
.weight .label{width:150px}
.track,.axis{flex:1;height:12px;background:#eee;position:relative;border-radius:2px}
.fill{position:absolute;left:0;top:0;bottom:0;border-radius:2px}
.fill.rating{background:#2e7d32}.fill.generic{background:#9e9e9e}.fill.personalized{background:#1565c0}
.axis:after{content:"";position:absolute;left:50%;top:-2px;bottom:-2px;border-left:1px solid #888}
.w{position:absolute;top:0;bottom:0}.w.pos{background:#1565c0}.w.neg{background:#c62828}
.value{width:48px;text-align:right;flex:none}.none{color:#999}
.cluster{display:flex;align-items:center;gap:6px;margin:4px 0;font-size:12px}
.cluster .label{width:260px}.cluster img{width:72px;height:72px;object-fit:cover;border-radius:3px}
"""


def album_report(
    user_id: str,
    ranked: Sequence[ImageScore],
    images: Mapping[str, bytes],
    profile: Profile,
    ratings: Mapping[str, float] | None = None,
    *,
    failed: Sequence[ImageScore] = (),
) -> str:
    """The HTML page: the user's taste chart, the ranked photos with their three bars, then the photos
    that could not be scored (`failed`, each with its `error`), so none goes missing unnoticed.

    `images` maps an ImageScore.id to the image's bytes; `ratings` maps an id to the user's rating on [0, 1].
    """
    ratings = ratings or {}
    legend = "".join(
        f'<span><span class="swatch" style="background:{c}"></span>{k}</span>'
        for k, c in _BAR_COLOURS.items()
    )
    cards = []
    for rank, score in enumerate(ranked, start=1):
        data = images.get(score.id)
        thumb = f'<img alt="{html.escape(score.id)}" src="{thumbnail_data_uri(data)}">' if data else ""
        cards.append(
            f'<div class="card">{thumb}<div class="name">#{rank} {html.escape(score.id)}</div>'
            + _bar("rating", "rating", ratings.get(score.id))
            + _bar("generic", "generic", score.generic_score)
            + _bar("personalized", "personalized", score.score)
            + "</div>"
        )
    failures = "".join(
        f"<li>{html.escape(s.id or s.digest)}: {html.escape(s.error.message if s.error else '')}</li>"
        for s in failed
    )
    if failures:
        failures = f'<h2>Could not be scored ({len(failed)})</h2>\n<ul class="failed">{failures}</ul>'
    title = f"Album ranked for {html.escape(user_id)}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{_STYLE}</style></head>
<body>
<h1>{title}</h1>
<p>{profile.num_ratings} ratings, feature space {html.escape(profile.feature_space_version or "-")}.
Scores on [0, 1]; the personalized score is the generic score plus this person's learned residual.</p>
<h2>Taste profile: what raises (blue) or lowers (red) this person's scores</h2>
{_weight_chart(profile)}
{_content_section(ranked, images, profile)}
<h2>Photos, best first</h2>
<p class="legend">{legend}</p>
<div class="grid">
{"".join(cards)}
</div>
{failures}
</body></html>
"""
