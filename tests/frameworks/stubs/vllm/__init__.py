"""Stand-in for vllm (see ../README.md): importable, never called."""

from _stand_in import not_installed as SamplingParams  # noqa: F401, N812
