import pytest

from tandem.engine.request import SamplingParams


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(temperature=-0.1), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(min_p=1.5), "min_p"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(stop_token_ids=(-1,)), "stop_token_ids"),
    ],
)
def test_bad_values_raise_value_error_naming_the_parameter(kwargs, param):
    with pytest.raises(ValueError, match=param):
        SamplingParams(**kwargs)


def test_stop_string_becomes_tuple():
    assert SamplingParams(stop="x").stop == ("x",)
