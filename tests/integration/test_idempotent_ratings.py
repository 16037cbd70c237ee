"""AddRatings retried after a lost reply records the ratings once: the real gateway behind a loopback TCP
proxy that drops the first reply after the server has committed, the client retrying on its own."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import uuid
from collections.abc import Iterator

import grpc
import pytest

from piaa_client import Client, RetryPolicy
from piaa_client.api.v1 import piaa_pb2 as pb
from piaa_client.api.v1 import piaa_pb2_grpc as pb_grpc
from piaa_client.errors import InvalidRequest
from piaa_client.types import Rating
from tests.fixtures.gateway import GatewayProcess
from tests.fixtures.photos import Photo

HEADERS = 0x1
"""HTTP/2 frame type of a response's headers: the server sends them once the handler has returned."""


class ReplyDroppingProxy:
    """Forwards TCP connections to `target`; while `drops` > 0, the first response HEADERS frame a server
    sends is swallowed and both sockets are closed: the call ran to its end, its reply never arrives."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.drops = 0
        self.dropped = 0
        self.connections = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.connections += 1
            threading.Thread(target=self._requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._replies, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _requests(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _take_drop(self) -> bool:
        with self._lock:
            if self.drops <= 0:
                return False
            self.drops -= 1
            self.dropped += 1
            return True

    def _replies(self, src: socket.socket, dst: socket.socket) -> None:
        buffer = b""
        try:
            while data := src.recv(65536):
                buffer += data
                while len(buffer) >= 9:  # whole HTTP/2 frames: 3 length, 1 type, 1 flags, 4 stream id
                    end = 9 + int.from_bytes(buffer[:3], "big")
                    if len(buffer) < end:
                        break
                    frame, buffer = buffer[:end], buffer[end:]
                    stream = int.from_bytes(frame[5:9], "big") & 0x7FFFFFFF
                    if frame[3] == HEADERS and stream and self._take_drop():
                        return
                    dst.sendall(frame)
        except OSError:
            pass
        finally:
            _close(src, dst)

    def close(self) -> None:
        self.listener.close()


def _close(*sockets: socket.socket) -> None:
    for s in sockets:
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        s.close()


@pytest.fixture
def proxy(gateway: GatewayProcess) -> Iterator[ReplyDroppingProxy]:
    p = ReplyDroppingProxy(gateway.address)
    yield p
    p.close()


@pytest.fixture
def user() -> str:
    return f"idem-{uuid.uuid4().hex[:8]}"


def ratings(photos: list[Photo], start: int, n: int = 4) -> list[Rating]:
    return [Rating(p.path, 1 + i % 5) for i, p in enumerate(photos[start::23][:n])]


def test_a_reply_lost_after_the_commit_is_retried_and_records_once(
    gateway: GatewayProcess, proxy: ReplyDroppingProxy, photos: list[Photo], user: str
) -> None:
    rated = ratings(photos, 11)
    expected_digests = [hashlib.sha256(r.image.read_bytes()).hexdigest() for r in rated]  # type: ignore[union-attr]
    proxy.drops = 1
    retry = RetryPolicy(max_attempts=3, initial_backoff_s=0.05)
    with Client(proxy.address, timeout=120, retry=retry) as client:
        receipt = client.add_ratings(user, rated)
    assert proxy.dropped == 1 and proxy.connections >= 2  # the first reply was lost, gRPC reconnected
    assert receipt.replayed  # the retry found the first attempt's receipt
    assert receipt.digests == expected_digests
    assert receipt.profile.exists and receipt.profile.num_ratings == len(rated)
    with Client(gateway.address, timeout=60) as direct:
        assert direct.get_profile(user).num_ratings == len(rated)  # exactly one copy
        assert direct.delete_profile(user)


def test_the_same_request_id_again_returns_the_original_receipt(
    gateway: GatewayProcess, photos: list[Photo], user: str
) -> None:
    rated = ratings(photos, 12)
    with Client(gateway.address, timeout=120) as client:
        first = client.add_ratings(user, rated, request_id="album-7")
        again = client.add_ratings(user, rated, request_id="album-7")
        later = client.add_ratings(user, ratings(photos, 13, 2))  # a fresh id: recorded
        with pytest.raises(InvalidRequest, match=r"FAILED_PRECONDITION.*album-7"):
            client.add_ratings(user, ratings(photos, 14, 2), request_id="album-7")
        profile = client.get_profile(user)
        assert client.delete_profile(user)
    assert not first.replayed and again.replayed
    assert again.digests == first.digests and again.request_id == first.request_id == "album-7"
    assert (again.profile.num_ratings, again.profile.weights) == (
        first.profile.num_ratings,
        first.profile.weights,
    )
    assert not later.replayed and later.profile.num_ratings == len(rated) + 2
    assert profile.num_ratings == len(rated) + 2


def test_request_id_status_codes(gateway: GatewayProcess, photos: list[Photo], user: str) -> None:
    rating = pb.Rating(
        image=pb.Image(data=photos[15].path.read_bytes()), value=4, scale=pb.RATING_SCALE_STARS_1_5
    )
    with grpc.insecure_channel(gateway.address) as channel:
        stub = pb_grpc.PersonalizationStub(channel)
        for bad in ("a:b", "x" * 65, "{tag}"):
            with pytest.raises(grpc.RpcError) as refused:
                stub.AddRatings(
                    pb.AddRatingsRequest(user_id=user, ratings=[rating], request_id=bad), timeout=60
                )
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        request = pb.AddRatingsRequest(user_id=user, ratings=[rating], request_id="r1")
        assert not stub.AddRatings(request, timeout=60).replayed
        assert stub.AddRatings(request, timeout=60).replayed
        other = pb.AddRatingsRequest(
            user_id=user,
            ratings=[pb.Rating(image=rating.image, value=2, scale=rating.scale)],
            request_id="r1",
        )
        with pytest.raises(grpc.RpcError) as reused:
            stub.AddRatings(other, timeout=60)
        assert reused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        profile = stub.GetProfile(pb.GetProfileRequest(user_id=user), timeout=60)
        assert profile.num_ratings == 1
        stub.DeleteProfile(pb.DeleteProfileRequest(user_id=user), timeout=60)
