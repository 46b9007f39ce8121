from _stand_in import not_installed as random_uuid  # noqa: F401
