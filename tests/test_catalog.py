"""medplan.catalog: the built-in architecture names known without importing the models."""
import pytest

from medplan import catalog
from medplan.architectures.registry import MODELS
from medplan.errors import MedplanError
from medplan.registry import UnknownNameError


def test_the_catalog_is_the_registry_s_built_ins():
    assert catalog.BUILTIN_ARCHITECTURES == {e.name for e in MODELS.entries() if e.builtin}
    assert MODELS.group == catalog.ARCHITECTURE_PLUGINS


def test_unknown_names_get_the_registry_s_kind_of_error(monkeypatch):
    monkeypatch.setattr(catalog, "plugins_installed", lambda group=catalog.ARCHITECTURE_PLUGINS: False)
    assert catalog.check_architectures(["unet", "swin_umamba"]) == ["unet", "swin_umamba"]
    with pytest.raises(UnknownNameError, match=r"unknown architecture 'swin_umama' \(did you mean swin_umamba\?\)"
                                               r"; known: hiformer_b, "):
        catalog.check_architectures(["unet", "swin_umama"])
    with pytest.raises(UnknownNameError) as err:
        catalog.check_architectures(["zzz"])
    assert "did you mean" not in str(err.value)
    with pytest.raises(MedplanError, match="invalid architecture name '../x'"):
        catalog.check_architectures(["../x"])


def test_a_plugin_may_add_any_well_formed_name(monkeypatch):
    # plug-ins register when imported: with one installed, the registry decides later
    monkeypatch.setattr(catalog, "plugins_installed", lambda group=catalog.ARCHITECTURE_PLUGINS: True)
    assert catalog.check_architectures(["my_net"]) == ["my_net"]
    with pytest.raises(MedplanError, match="invalid architecture name"):
        catalog.check_architectures(["a/b"])
