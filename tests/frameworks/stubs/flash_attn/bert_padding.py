from _stand_in import not_installed as index_first_axis  # noqa: F401
from _stand_in import not_installed as pad_input  # noqa: F401
from _stand_in import not_installed as rearrange  # noqa: F401
from _stand_in import not_installed as unpad_input  # noqa: F401
