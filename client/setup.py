"""Builds piaa-client, generating the gRPC stubs from the protos first."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithStubs(build_py):
    def run(self) -> None:
        from generate_stubs import generate

        generate()
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
