from _stand_in import not_installed as TokensPrompt  # noqa: F401, N812
