"""Built-in deformable architectures. Importing this package registers them."""

from dcn_inspect.models import attention_net, demo_net, resnet  # noqa: E402,F401  (registration side effects)
from dcn_inspect.models.registry import (
    ARCHITECTURES,
    Architecture,
    Preprocess,
    get,
    names,
    register,
)

__all__ = ["ARCHITECTURES", "Architecture", "Preprocess", "get", "names", "register"]
