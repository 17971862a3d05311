"""settings.py: the checks a Setting makes (first-order settings)."""

import pytest

from lorablend.errors import InputError
from lorablend.settings import Setting


@pytest.mark.parametrize("kw, needle", [
    (dict(metric="grad+js"), "--rerank"),
    (dict(metric="grad+kl", operator="neural", rerank=4), "neural"),
    (dict(metric="grad", operator="neural"), "neural"),
])
def test_first_order_settings_refused_with_one_line(kw, needle):
    with pytest.raises(InputError, match=needle):
        Setting(**kw).check()
