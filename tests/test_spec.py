"""Requirement keys: normalization decides which calls share an environment."""
import sys

import pytest

from fal_magic import EnvironmentBuildError
from fal_magic.envs import make_spec
from fal_magic.envs.spec import normalize_requirement


def test_order_case_and_duplicates_do_not_change_the_key():
    a = make_spec(["Requests", "numpy"])
    b = make_spec(["numpy", "requests", "NumPy"])
    assert a.key == b.key
    assert a.requirements == ("numpy", "requests")


def test_a_pin_changes_the_key():
    assert make_spec(["requests==2.31"]).key != make_spec(["requests"]).key
    assert make_spec(["requests==2.31"]).key != make_spec(["requests==2.32"]).key


def test_names_are_canonical_per_pep_503():
    assert normalize_requirement("Foo_Bar.baz[Extra_One]>=1.0, <2") == "foo-bar-baz[extra-one]<2,>=1.0"


def test_one_string_is_one_requirement():
    assert make_spec("humanize==4.16.0").requirements == ("humanize==4.16.0",)


def test_key_changes_with_the_python_and_the_cloudpickle_version():
    import dataclasses

    spec = make_spec(["humanize"])
    assert spec.python.endswith(f"{sys.version_info.major}.{sys.version_info.minor}")
    assert dataclasses.replace(spec, python="cpython-3.99").key != spec.key
    assert dataclasses.replace(spec, cloudpickle="0.0.1").key != spec.key
    assert dataclasses.replace(spec).key == spec.key


@pytest.mark.parametrize("bad", ["not a requirement!!", "numpy>>1", ""])
def test_invalid_specifier_is_a_build_error_naming_it(bad):
    with pytest.raises(EnvironmentBuildError, match="invalid requirement"):
        make_spec([bad])


def test_cloudpickle_pin_that_excludes_the_host_version_names_both_sides():
    with pytest.raises(EnvironmentBuildError, match=r"cloudpickle==0\.1.*host's cloudpickle=="):
        make_spec(["cloudpickle==0.1"])


def test_install_list_adds_the_kernel_and_the_host_cloudpickle():
    import cloudpickle

    spec = make_spec(["humanize"])
    assert spec.install_list == ["humanize", "ipykernel", f"cloudpickle=={cloudpickle.__version__}"]
