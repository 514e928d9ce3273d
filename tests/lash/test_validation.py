import math

import pytest
import torch

from lash.validation import check_bool, check_device, check_index, check_int, check_optional_int, check_real, check_token_ids
from lash_kernels import multi_exit_cross_entropy, values_checked


@pytest.mark.parametrize("value", [0, -3, 1.0, True, "2", None])
def test_check_int_names_the_field_and_the_bound(value):
    with pytest.raises(ValueError, match=rf"^n={value!r} must be an int >= 1$"):
        check_int("n", value, 1)
    check_int("n", 1, 1)


def test_check_optional_int_allows_none():
    check_optional_int("n", None, 1)
    with pytest.raises(ValueError, match=r"n=0 must be None or an int >= 1"):
        check_optional_int("n", 0, 1)


def test_check_real_intervals():
    check_real("x", 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match=r"x=0.0 is outside \(0.0, 1.0\]"):
        check_real("x", 0.0, 0.0, 1.0, low_open=True)
    with pytest.raises(ValueError, match=r"x=nan must be a finite number in \[0.0, inf\)"):
        check_real("x", math.nan, 0.0)
    with pytest.raises(ValueError, match=r"x=True must be a finite number"):
        check_real("x", True, 0.0)


def test_check_bool_and_device():
    check_bool("flag", False)
    with pytest.raises(ValueError, match="flag='no' must be True or False"):
        check_bool("flag", "no")
    assert check_device("device", "cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="is not a device"):
        check_device("device", "toaster")


def test_check_token_ids():
    check_token_ids(torch.tensor([0, 4, -100]), 5, ignore_index=-100)
    with pytest.raises(ValueError, match=r"token id 5 is outside \[0, 5\)"):
        check_token_ids(torch.tensor([0, 5]), 5)
    with pytest.raises(ValueError, match="must be an integer tensor"):
        check_token_ids(torch.zeros(2), 5)


@pytest.mark.parametrize("value", [0, 4, 2.0, True, None])
def test_check_index_range(value):
    with pytest.raises(ValueError, match=rf"^layer={value!r} is outside \[1, 3\] \(why\)$"):
        check_index("layer", value, 1, 3, " (why)")
    assert check_index("layer", 3, 1, 3) == 3


def test_values_checked_skips_value_checks_but_not_shapes_or_dtypes():
    ids = torch.tensor([[1, 99]])
    with pytest.raises(ValueError, match="token id 99 is outside"):
        check_token_ids(ids, 10)
    with values_checked():
        check_token_ids(ids, 10)  # the caller vouches for the values
        with pytest.raises(ValueError, match="integer tensor"):
            check_token_ids(ids.float(), 10)
        with pytest.raises(ValueError, match="targets must have shape"):
            multi_exit_cross_entropy([torch.randn(3, 4)], torch.randn(5, 4), torch.tensor([0, 1]), [1.0])
    with pytest.raises(ValueError, match="token id 99 is outside"):
        check_token_ids(ids, 10)  # and only inside
