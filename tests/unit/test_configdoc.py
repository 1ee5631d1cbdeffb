"""docs/configuration.md is generated from the traits and must be current."""

from jupyterhub_outpost_mq.deploy.configdoc import main, render


def test_configuration_reference_is_current() -> None:
    assert main(["--check"]) == 0, "run: python -m jupyterhub_outpost_mq.deploy.configdoc"


def test_every_reference_trait_is_documented_with_an_example_where_upstream_had_one() -> None:
    text = render()
    for name in ("request_url", "custom_env", "ssh_node", "check_allowed", "apply_user_options", "group_overrides"):
        assert f"### `{name}`" in text
    assert text.count("```python") >= 25
