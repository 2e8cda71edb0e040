"""ServeConfig: defaults, YAML + CLI precedence, clear errors."""
import pytest

from aurora.cli import build_parser, main
from aurora.server import config
from aurora.server.config import ServeConfig


def test_defaults():
    cfg = ServeConfig()
    assert cfg.target == "smollm2" and cfg.draft == "scratch" and cfg.num_draft_tokens == 5
    assert cfg.run_dir.startswith("runs") and cfg.wandb in ("offline", "online")
    assert cfg.sglang_swap == "step" and cfg.train_batch_tokens is None  # chosen for the device (DEVICE_DEFAULTS)


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lookahead: 6\nmax_batch: 8\ndraft: null\nport: 9000\n")
    args = vars(build_parser().parse_args(["serve", "--config", str(path), "--port", "9100", "--lr", "3e-4"]))
    overrides = {k: v for k, v in args.items() if k not in ("command", "config")}
    cfg = ServeConfig.load(str(path), **overrides)
    assert (cfg.lookahead, cfg.num_draft_tokens, cfg.max_batch, cfg.draft, cfg.port, cfg.lr) == \
        (6, 7, 8, None, 9100, 3e-4)
    assert build_parser().parse_args(["serve", "--draft", "none"]).draft is None


@pytest.mark.parametrize("kwargs, message", [
    ({"engine": "vllm"}, "engine must be one of"),
    ({"lookahead": 0}, "lookahead must be an integer >= 1"),
    ({"num_draft_tokens": 3}, "num_draft_tokens must be lookahead+1"),
    ({"topk": 4, "num_draft_tokens": 30, "engine": "sglang"}, "num_draft_tokens must be in"),
    ({"topk": 0}, "topk must be an integer >= 1"),
    ({"sample_rate": 1.5}, "sample_rate must be in (0, 1]"),
    ({"sample_rate": 0.0}, "sample_rate must be in (0, 1]"),
    ({"objective": "mse"}, "objective must be one of"),
    ({"train_precision": "fp16"}, "train_precision must be one of"),
    ({"wandb": "yes"}, "wandb must be one of"),
    ({"port": 70000}, "port must be in"),
    ({"device": "tpu"}, "device must be"),
    ({"train_batch_tokens": 0}, "train_batch_tokens must be an integer >= 1"),
    ({"buffer_gib": 0}, "buffer_gib must be > 0"),
    ({"sglang_swap": "drain"}, "sglang_swap must be pause or step"),
    ({"sglang_capture_topk": -1}, "sglang_capture_topk must be an integer in [0, 1024]"),
    ({"sglang_capture_topk": 8, "sglang_capture_final": True}, "leave sglang_capture_topk at 0"),
    ({"sglang_capture_final": "yes"}, "sglang_capture_final must be true or false"),
    ({"admission_wait": -1}, "admission_wait must be an integer >= 0"),
    ({"train_ttt_steps": 5}, "train_ttt_steps must be auto or an integer in [0, lookahead=4]"),
    ({"train_ttt_steps": "grow"}, "train_ttt_steps must be auto or an integer"),
    ({"admission_wait": 2, "engine": "sglang"}, "admission_wait is a built-in engine setting"),
])
def test_invalid(kwargs, message):
    with pytest.raises(ValueError) as e:
        ServeConfig(**kwargs)
    assert str(e.value).startswith("ServeConfig: ") and message in str(e.value)


def test_unknown_yaml_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("lookahed: 6\n")
    assert main(["serve", "--config", str(path)]) == 2
    assert "unknown keys ['lookahed']" in capsys.readouterr().err


def test_keys_are_redacted():
    assert ServeConfig(api_key="sk", admin_key="ad").to_dict()["api_key"] == "***"


def test_training_options_reach_the_trainer_config(tmp_path):
    from aurora.service import _train_config
    from aurora.training.trainer import PRECISIONS
    cfg = ServeConfig(buffer_gib=0.5, train_batch_tokens=1024, buffer_samples=64, replay_passes=2,
                      train_precision="bf16", train_ttt_steps=1)
    t = _train_config(cfg, str(tmp_path), "cpu")
    assert (t.buffer_bytes, t.batch_tokens, t.buffer_samples, t.replay_passes) == (1 << 29, 1024, 64, 2)
    assert (t.ttt_length, t.steps_trained) == (4, 1)
    assert _train_config(ServeConfig(train_ttt_steps=0), "", "cpu").steps_trained == 4
    assert t.precision == "bf16" and ServeConfig().train_precision == "auto"
    assert config.PRECISIONS == PRECISIONS  # the flag's choices are the trainer's
    # `--train-ttt-steps auto` parses as the word, a count as an int, and "auto" reaches the trainer
    parse = lambda v: build_parser().parse_args(["serve", "--train-ttt-steps", v]).train_ttt_steps  # noqa: E731
    assert (parse("auto"), parse("2")) == ("auto", 2)
    auto = _train_config(ServeConfig(), "", "cpu")  # the default
    assert (auto.train_steps, auto.steps_trained) == ("auto", 1)


def test_trainer_graphs_are_off_only_where_the_trainer_shares_sglangs_gpu(tmp_path):
    """Beside SGLang a trainer on one of its GPUs steps eagerly (the GPU time-slices the two processes); on a GPU
    of its own, or beside the built-in engine, it replays graphs unless told not to."""
    from aurora.service import _sglang_train_config, _train_config

    cfg = ServeConfig(engine="sglang", tp_size=2)
    assert not _sglang_train_config(cfg, str(tmp_path), "cuda:1").graphs
    assert _sglang_train_config(cfg, str(tmp_path), "cuda:2").graphs
    assert _sglang_train_config(ServeConfig(engine="sglang", sglang_args="--base-gpu-id 1"), str(tmp_path),
                                "cuda:0").graphs
    assert _train_config(ServeConfig(), str(tmp_path), "cuda:0").graphs
    assert not _train_config(ServeConfig(train_graphs=False), str(tmp_path), "cuda:0").graphs


def test_keys_from_environment_and_files(tmp_path, monkeypatch):
    monkeypatch.setenv("AURORA_API_KEY", "from-env")
    monkeypatch.setenv("AURORA_ADMIN_KEY", "admin-env")
    assert (ServeConfig.load().api_key, ServeConfig.load().admin_key) == ("from-env", "admin-env")
    assert ServeConfig.load(api_key="from-flag").api_key == "from-flag"  # a flag wins over the environment
    key = tmp_path / "key"
    key.write_text("  from-file\n")
    cfg = ServeConfig.load(api_key_file=str(key))
    assert cfg.api_key == "from-file" and cfg.to_dict()["api_key"] == "***" and cfg.secrets() == ["from-file",
                                                                                                    "admin-env"]
    with pytest.raises(ValueError, match="api_key or api_key_file, not both"):
        ServeConfig(api_key="a", api_key_file=str(key))
    with pytest.raises(ValueError, match="cannot read"):
        ServeConfig(admin_key_file=str(tmp_path / "missing"))
    key.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        ServeConfig(api_key_file=str(key))


def test_redact_command_line():
    from aurora.server.config import redact
    assert redact(["serve", "--api-key", "k1", "--admin-key=k2", "--port", "1"], ["k1", "k2"]) == \
        ["serve", "--api-key", "***", "--admin-key=***", "--port", "1"]


def test_every_flag_has_real_help(capsys):
    from dataclasses import fields

    from aurora.cli import _HELP

    assert {f.name for f in fields(ServeConfig)} <= set(_HELP)  # no flag falls back to its own name
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = capsys.readouterr().out
    for placeholder in ("topk [", "buffer gib", "  host [", "[default: None]", "[default: ]"):
        assert placeholder not in text


def test_sglang_captures_the_final_state_unless_the_top_k_is_asked_for():
    assert ServeConfig().sglang_capture_final is True
    assert ServeConfig(sglang_capture_topk=8).sglang_capture_final is False
    assert ServeConfig(sglang_capture_final=False).sglang_capture_final is False
    flags = vars(build_parser().parse_args(["serve", "--no-sglang-capture-final"]))
    flags = {k: v for k, v in flags.items() if k not in ("command", "config")}
    assert ServeConfig.load(None, **flags).sglang_capture_final is False


def test_boolean_flags_bare_negated_or_valued():
    parse = lambda *a: vars(build_parser().parse_args(["serve", *a]))  # noqa: E731
    assert parse("--resume")["resume"] is True and parse("--no-resume")["resume"] is False
    assert parse("--resume", "false")["resume"] is False and parse("--resume", "--port", "1")["resume"] is True
    assert parse("--trust-remote-code")["trust_remote_code"] is True
    assert parse("--fused-kernels", "off")["fused_kernels"] is False and "fused_kernels" not in parse()
    with pytest.raises(SystemExit):
        parse("--resume", "maybe")


def test_version(capsys):
    from aurora import __version__
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"aurora {__version__}"


def test_training_settings_follow_the_device_unless_given():
    from aurora.server.config import DEVICE_DEFAULTS

    cpu, chosen = ServeConfig().for_device("cpu")
    assert chosen == DEVICE_DEFAULTS["cpu"]
    assert (cpu.draft_vocab_size, cpu.vocab_warmup_requests, cpu.sync_every, cpu.lr, cpu.train_batch_tokens) == (
        2048, 8, 16, 1e-3, 512)
    cuda, _ = ServeConfig().for_device("cuda")
    assert (cuda.draft_vocab_size, cuda.sync_every, cuda.lr, cuda.train_batch_tokens) == (0, 800, 1e-3, 2048)
    given, chosen = ServeConfig(sync_every=5, draft_vocab_size=0, train_batch_tokens=1024).for_device("cpu")
    assert (given.sync_every, given.draft_vocab_size, given.lr, given.train_batch_tokens) == (5, 0, 1e-3, 1024)
    assert set(chosen) == {"vocab_warmup_requests", "lr"}
    args = vars(build_parser().parse_args(["serve", "--sync-every", "7"]))
    assert args == {"command": "serve", "config": None, "sync_every": 7}  # unset flags stay unset
    with pytest.raises(ValueError, match="draft_vocab_size must be an integer >= 0"):
        ServeConfig(draft_vocab_size=-1)


def test_help_states_the_device_defaults(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "[default: 16 on cpu, 800 on cuda]" in help_text and "[default: 2048 on cpu, 0 on cuda]" in help_text


def test_service_on_the_cpu_prunes_the_day0_vocabulary_and_says_so(tmp_path, caplog):
    import logging

    from aurora.service import Service

    caplog.set_level(logging.INFO, logger="aurora.service")
    service = Service.from_config(ServeConfig(device="cpu", max_batch=2, max_model_len=128, sync_every=50,
                                              run_dir=str(tmp_path), wandb="disabled"))
    try:
        draft = service.engine.engine.draft
        assert draft.config.draft_vocab_size == 2048 and draft.config.vocab_size == 49152
        assert service.trainer is None and service._warmup == 8  # the vocabulary waits for the first requests
        assert (service.config.sync_every, service.config.lr) == (50, 1e-3)
        line, = [r.getMessage() for r in caplog.records if "training settings chosen" in r.getMessage()]
        assert "cpu" in line and "draft_vocab_size=2048" in line and "sync_every" not in line
    finally:
        service.shutdown()


def test_a_serving_floor_reaches_the_trainer_and_sets_its_day0_share(tmp_path):
    from aurora.service import Service

    service = Service.from_config(ServeConfig(device="cpu", max_batch=2, max_model_len=128, draft_vocab_size=0,
                                              serving_floor=0.97, run_dir=str(tmp_path), wandb="disabled"))
    try:
        sharing = service.trainer.status()["sharing"]
        assert sharing["floor"] == 0.97 and sharing["duty"] == 0.1
        assert sharing["duty_now"] == pytest.approx(0.03)  # day 0: the decision's speedup is 1
    finally:
        service.shutdown()
    with pytest.raises(ValueError, match="serving_floor"):
        ServeConfig(serving_floor=1.0)
