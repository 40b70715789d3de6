import pytest

from pipeline.params import ParamsError, load_params


def test_repo_params_load_and_hash_is_stable():
    a = load_params("params.yaml")
    b = load_params("params.yaml")
    assert a.hash() == b.hash()
    assert a.train.model.endswith(".yaml")
    assert a.validate_.min_instances_per_class >= 1


def test_overrides_are_typed_like_yaml():
    p = load_params("params.yaml", ["train.epochs=3", "qat.ptq=false", "sensitivity.ratios=[0.1, 0.5]",
                                    "registry.uri=s3://bucket/models"])
    assert p.train.epochs == 3 and isinstance(p.train.epochs, int)
    assert p.qat.ptq is False
    assert p.sensitivity.ratios == [0.1, 0.5]
    assert p.registry.uri == "s3://bucket/models"
    assert p.hash() != load_params("params.yaml").hash()


def test_a_bare_off_is_off_where_a_choice_offers_it():
    """YAML reads a bare `off` as false; `--set qat.mixed_precision=off` must still mean "off"."""
    p = load_params("params.yaml", ["qat.mixed_precision=off", "export.openvino=off"])
    assert p.qat.mixed_precision == "off" and p.export.openvino == "off"
    with pytest.raises(ParamsError, match="qat.ptq"):
        load_params("params.yaml", ["qat.ptq=nope"])


def test_data_option_points_at_another_dataset():
    p = load_params("params.yaml", data="elsewhere/ds/data.yaml")
    assert p.data.yaml == "elsewhere/ds/data.yaml"
    assert p.data.dir == "elsewhere/ds"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "train.epoch"),  # typo: unknown key
    ("train.epochs=lots", "train.epochs"),  # wrong type
    ("noequals", "key.sub=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ParamsError, match=message.replace(".", r"\.")):
        load_params("params.yaml", [override])


def test_broken_params_file_names_the_file(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match=str(bad)):
        load_params(bad)


def test_environment_overrides_sit_between_file_and_command_line(monkeypatch):
    monkeypatch.setenv("PIPELINE_REGISTRY__URI", "s3://models/edge")
    monkeypatch.setenv("PIPELINE_TRAIN__EPOCHS", "7")
    monkeypatch.setenv("PIPELINE_UNRELATED", "ignored")  # no section separator: not a params entry
    p = load_params("params.yaml")
    assert p.registry.uri == "s3://models/edge" and p.train.epochs == 7
    assert load_params("params.yaml", ["train.epochs=9"]).train.epochs == 9


def test_params_yaml_spells_out_every_default():
    # params.yaml is the reference users read: it lists every entry (unset gates aside) with the model's defaults.
    import yaml

    from pipeline.params import Params

    assert load_params("params.yaml").as_dict() == Params().as_dict()

    def leaves(tree, prefix=""):
        found = set()
        for key, value in tree.items():
            if isinstance(value, dict):
                found |= leaves(value, f"{prefix}{key}.")
            elif value is not None or ".gates." not in f".{prefix}":
                found.add(f"{prefix}{key}")
        return found

    with open("params.yaml") as f:
        assert leaves(Params().as_dict()) <= leaves(yaml.safe_load(f))
