"""`--config config.yaml`: flag names as keys, dotted keys for nested settings, flags win."""

from __future__ import annotations

import pytest

from twinfer.cli import _parse_args, build_parser


def _parse(tmp_path, yaml_text: str, *argv: str):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    return _parse_args(build_parser(), ["serve", "--config", str(path), *argv])


def test_file_values_become_defaults_and_flags_win(tmp_path):
    args = _parse(
        tmp_path,
        "max-model-len: 128\nmax_num_seqs: 3\nserved-model-name: cfg\n"
        "enable_prefix_caching: false\nport: 9001\nshutdown_timeout: 5\n",
        "--max-model-len",
        "200",
    )
    assert args.max_model_len == 200  # the command line overrides the file
    assert (args.max_num_seqs, args.served_model_name, args.port) == (3, "cfg", 9001)
    assert args.enable_prefix_caching is False and args.shutdown_timeout == 5


def test_dotted_and_nested_keys_set_nested_settings(tmp_path):
    args = _parse(tmp_path, "compilation_config.cudagraph_mode: NONE\n")
    assert args.compilation_config.cudagraph_mode == "none"
    args = _parse(tmp_path, "compilation_config:\n  max_cudagraph_capture_size: 8\n")
    assert args.compilation_config.max_cudagraph_capture_size == 8


@pytest.mark.parametrize(
    ("yaml_text", "named"),
    [
        ("max_num_seqz: 3\n", "max_num_seqz"),
        ("compilation_config.cudagraph_modez: none\n", "cudagraph_modez"),
        ("compilation_config.cudagraph_mode: sometimes\n", "sometimes"),
        ("max_num_seqs: many\n", "max_num_seqs"),
        ("max_num_seqs: [1, 2]\n", "max_num_seqs"),
        ("enable_prefix_caching: 3\n", "enable_prefix_caching"),
        ("dtype: float64\n", "dtype"),
        ("- a list\n", "mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_config_files_name_the_problem(tmp_path, yaml_text, named):
    with pytest.raises(ValueError, match=named):
        _parse(tmp_path, yaml_text)


def test_unknown_key_exits_2_with_the_key_named(tmp_path):
    from tests.cli_runner import run_twinfer

    path = tmp_path / "bad.yaml"
    path.write_text("max_num_seqs: 2\nbogus_flag: 1\n")
    result = run_twinfer("serve", "--config", str(path))
    assert result.returncode == 2
    assert "bogus_flag" in result.stderr and "Traceback" not in result.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read --config"):
        _parse_args(build_parser(), ["serve", "--config", str(tmp_path / "nope.yaml")])
