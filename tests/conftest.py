"""Shared fixtures: tiny random-init open_clip models saved as local-dir folders, small image sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

# The suite decides its own thread count, not the environment (issue 19): float reductions in torch, OpenMP,
# MKL and OpenBLAS change with the number of threads, so a determinism test whose two runs used different
# counts (this process and a child, or a developer's exported OMP_NUM_THREADS and a new user's unset one)
# compares different floats. Set before torch is imported, so this process and every subprocess a test
# starts (they inherit os.environ) run at one thread; torch.set_num_threads below covers an earlier import.
SUITE_THREADS = 1
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
for _var in THREAD_VARS:
    os.environ[_var] = str(SUITE_THREADS)

import numpy as np
import pytest
from PIL import Image

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16, "pool_type": "avg"},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def save_tiny_model(directory: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """Create a random-init tiny CLIP and save it as an open_clip local-dir (config + safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = cfg or TINY_CFG
    directory.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": cfg["vision_cfg"]["image_size"], "mean": [0.5] * 3, "std": [0.5] * 3}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{directory}")  # config only: random init
    with torch.no_grad():  # a less degenerate random model: diverse image features, strong token embeddings
        tower = getattr(model, "text", model)
        tower.token_embedding.weight.normal_(0, 0.5)
        model.logit_scale.fill_(float(np.log(50.0)))
        model.visual.conv1.weight.mul_(10.0)
        model.visual.positional_embedding.mul_(0.1)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    return directory


def random_images(n: int, seed: int, size: int = 32) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


CLASS_NAMES = ("annual crop land", "forest", "river", "sea or lake", "highway", "pasture land")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ImageFolder: DATA/train (6 a class) + DATA/test (5 a class), 3 classes of blocky random images."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 5)):
        for cls in ("annual_crop", "forest", "river"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                Image.fromarray(img).resize((32, 32), Image.NEAREST).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-clip")


@pytest.fixture(scope="session")
def tiny_client(tiny_model_dir: Path):
    from craft_sdk.client.openclip import OpenCLIPClient

    return OpenCLIPClient(f"local-dir:{tiny_model_dir}")


def suite_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess a test starts: this process's, with the suite's thread count explicit."""
    return {**os.environ, **{var: str(SUITE_THREADS) for var in THREAD_VARS}, **extra}


def _torch():  # noqa: ANN202
    try:  # the torch-free deploy venv runs tests/test_deploy_torchfree.py with this conftest
        import torch
    except ImportError:
        return None
    return torch


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(SUITE_THREADS)


@pytest.fixture(autouse=True)
def _suite_thread_count():  # noqa: ANN202
    """Every test starts at the suite's torch thread count, and a test that changes it cannot leak the change."""
    torch = _torch()
    if torch is not None and torch.get_num_threads() != SUITE_THREADS:
        torch.set_num_threads(SUITE_THREADS)
    yield


# ---------------------------------------------------------------------------------------------- test tiers
# The fast tier is `python -m pytest -q -m "not slow"` (README, Development); the Quickstart's command runs
# everything. A test is slow when it took over ~1.2 s (one parametrisation) or ~5 s (its whole family) on a quiet
# 2-core machine (measured with --durations=0, issue 21); every module keeps fast tests. Markers:
#   slow: listed below;  subprocess: starts a Python or server process;  server: talks to a server it started.
SLOW_TESTS = frozenset({
    "test_canary.py::test_hosted_clients_carry_a_canary",
    "test_classifier.py::test_fit_integer_labels_predicts_integers",
    "test_classifier.py::test_fit_tunes_and_returns_self",
    "test_cli.py::test_errors_are_one_line_without_traceback",
    "test_cli.py::test_resume_needs_checkpoint_dir",
    "test_cli.py::test_tune_eval_inspect",
    "test_cli.py::test_tune_human_output",
    "test_cli.py::test_tune_refiner_options_reach_the_adapter",
    "test_cost.py::test_dry_run_on_a_prediction_server_uploads_nothing_and_matches_the_run",
    "test_cost.py::test_dry_run_reports_refusals_and_usage_errors",
    "test_cost.py::test_dry_run_sends_nothing_and_estimates_the_run_within_10_percent",
    "test_cost.py::test_plan_equals_what_a_full_budget_run_uses",
    "test_cost.py::test_plan_of_the_hosted_shapes",
    "test_demo_run.py::test_run_demo_writes_everything",
    "test_demo_tasks.py::test_demo_vlm_zero_shot_digits_matches_record",
    "test_deploy_torchfree.py::test_the_deploy_path_loads_no_training_module",
    "test_discrete.py::test_craft_on_a_text_only_client_keeps_the_refiner_and_the_words",
    "test_discrete.py::test_tuner_searches_the_template_words_of_a_text_only_client",
    "test_examples.py::test_make_digits_asset_reproduces_the_shipped_file",
    "test_examples.py::test_make_shipped_adapters_smoke",
    "test_examples.py::test_pretrain_demo_vlm_smoke",
    "test_examples.py::test_quickstart_adapter",
    "test_examples.py::test_text_only_api",
    "test_faults.py::test_ledger_equals_the_servers_bill_when_the_server_refuses",
    "test_faults.py::test_outage_stops_with_a_clear_error_and_the_run_resumes",
    "test_faults.py::test_server_budget_stops_the_tune_cleanly",
    "test_faults.py::test_server_dies_and_comes_back_empty",
    "test_faults.py::test_timeouts_give_up_with_a_clear_error",
    "test_faults.py::test_tune_through_every_transient_fault_gives_the_same_adapter",
    "test_first_hour.py::test_a_budget_below_one_generation_is_refused_up_front",
    "test_first_hour.py::test_ctrl_c_leaves_a_resumable_run_and_prints_the_command",
    "test_first_hour.py::test_generations_reported_are_the_generations_run",
    "test_first_hour.py::test_python_tune_reports_progress_and_phases",
    "test_first_hour.py::test_resume_outlook_accounts_for_early_stopping",
    "test_first_hour.py::test_single_folder_with_24_images_per_class_tunes_at_the_default_shots",
    "test_first_hour_errors.py::test_sweep_worker_failures_have_no_traceback",
    "test_hosted.py::test_429_retry_after_is_honoured_with_one_idempotency_key",
    "test_hosted.py::test_transient_faults_are_retried_and_billed_once",
    "test_hosted_tune.py::test_cli_tune_pr_over_chat_then_predict",
    "test_hosted_tune.py::test_robust_craft_over_embed_then_onnx_deploy",
    "test_http.py::test_cli_tune_through_the_server",
    "test_http.py::test_serve_command_runs_a_real_server",
    "test_http.py::test_tune_over_http_equals_in_process",
    "test_hub.py::test_cli_predict_takes_a_hub_id_offline",
    "test_meter_integrity.py::test_a_lease_lapsing_in_a_redis_stall_never_leaves_an_answer_unbilled",
    "test_meter_integrity.py::test_a_locked_sqlite_state_gives_503_and_health_answers",
    "test_meter_integrity.py::test_a_metered_population_stopped_at_the_compute_budget_is_sent_again_in_halves",
    "test_meter_integrity.py::test_a_request_over_its_time_budget_stops_and_bills_only_what_was_computed",
    "test_meter_integrity.py::test_a_request_whose_client_left_mid_computation_stops_and_bills_only_what_was_computed",
    "test_meter_integrity.py::test_a_second_server_without_the_budget_flag_keeps_the_budget",
    "test_meter_integrity.py::test_an_answer_whose_charge_was_refunded_is_not_delivered_past_the_budget",
    "test_meter_integrity.py::test_finish_never_recreates_a_partial_record",
    "test_meter_integrity.py::test_httpclient_counts_a_store_outage_as_unbilled",
    "test_meter_integrity.py::test_httpclient_records_the_queries_billed_for_a_request_over_its_time_budget",
    "test_meter_integrity.py::test_serve_on_a_flushed_redis_without_the_budget_flag_refuses_to_start",
    "test_meter_integrity.py::test_serve_store_timeout_option",
    "test_meter_integrity.py::test_the_redis_password_comes_from_the_environment",
    "test_onnx.py::test_torch_2_14_exporter_agrees_with_our_graph",
    "test_predict_batch.py::test_predict_decodes_huge_images_reduced_and_small_ones_unchanged",
    "test_predict_batch.py::test_ray_data_predictor_on_two_workers",
    "test_resume.py::test_cli_checkpoint_every_resume_and_refusal",
    "test_resume.py::test_resume_after_checkpoint_is_byte_identical",
    "test_resume.py::test_sigkill_mid_run_then_resume",
    "test_robust.py::test_adapters_record_every_image_they_saw_whatever_the_entry_point",
    "test_robust.py::test_inert_prompt_search_stops_and_keeps_the_refiner",
    "test_robust.py::test_nothing_can_help_ends_in_the_zero_shot_fallback",
    "test_robust.py::test_paper_protocol_reproduces_the_previous_default",
    "test_robust.py::test_planned_generations_are_affordable_and_maximal",
    "test_robust.py::test_robust_pr_trains_the_refiner_whatever_the_budget",
    "test_robust.py::test_robust_run_resumes_to_the_same_adapter",
    "test_robust.py::test_selection_and_calibration_spend_no_query",
    "test_runstate.py::test_a_checkpoint_written_before_runstate_resumes_to_the_same_adapter",
    "test_runstate.py::test_finish_robust_reads_the_state_and_returns_values",
    "test_runstate.py::test_records_serialise_to_the_recorded_json_shape",
    "test_selection.py::test_a_calibrated_model_keeps_temperature_one",
    "test_selection.py::test_a_clear_overconfidence_is_corrected_and_shrunk_by_evidence",
    "test_selection.py::test_a_prompt_that_does_nothing_is_deployed_at_most_five_percent_of_the_time",
    "test_selection.py::test_a_real_client_whose_prompt_does_nothing_rarely_deploys_it",
    "test_selection.py::test_a_run_that_can_certify_nothing_buys_no_search",
    "test_selection.py::test_an_inert_search_stops_in_fewer_queries_than_patience_alone",
    "test_selection.py::test_pg_on_a_client_that_ignores_prompts_keeps_no_refiner_it_never_had",
    "test_server_hardening.py::test_a_big_request_does_not_starve_another_key",
    "test_server_hardening.py::test_codec_fuzz_structured_headers_raise_only_wire_errors",
    "test_server_hardening.py::test_slow_headers_and_bodies_are_cut_off",
    "test_server_limits.py::test_a_request_whose_client_left_while_queued_is_not_computed_nor_billed",
    "test_server_state.py::test_sigkill_mid_tune_then_resume_within_the_key_budget",
    "test_server_state.py::test_two_processes_share_one_redis_budget_exactly",
    "test_server_state.py::test_workers_and_another_process_share_one_sqlite_budget_exactly",
    "test_shipped_adapters.py::test_shipped_adapter_reproduces_its_table",
    "test_sklearn.py::test_clone_shares_client_and_ledger_and_is_unfitted",
    "test_sklearn.py::test_cross_val_score_counts_every_tuning",
    "test_sklearn.py::test_grid_search_over_mode",
    "test_sklearn.py::test_pipeline",
    "test_sweep.py::test_killed_cli_sweep_resumes",
    "test_sweep.py::test_ray_mode_matches_local",
    "test_sweep.py::test_worker_processes_match_in_process_runs",
    "test_text_prompts.py::test_cli_inspects_and_predicts_with_a_text_adapter",
    "test_tuner.py::test_budget_is_a_hard_ceiling_even_with_validation",
    "test_tuner.py::test_external_ledger_ceiling_stops_run_cleanly",
    "test_tuner.py::test_modes_learn_what_they_should",
    "test_tuner.py::test_planted_solution_needs_the_fitness",
    "test_tuner.py::test_probability_clients_are_tuned_on_log_probs",
    "test_tuner.py::test_same_seed_gives_byte_identical_adapter",
    "test_tuner.py::test_text_only_client_searches_words_not_offsets",
    "test_tuner.py::test_validation_selection_never_sees_test",
    "test_zeroshot_api.py::test_create_client_and_a_text_only_tune",
    "test_zeroshot_api.py::test_every_transient_fault_is_retried_and_billed_once",
    "test_zeroshot_api.py::test_serve_text_only_flag",
    "test_zeroshot_api.py::test_server_restart_mid_prediction",
    "test_zeroshot_api.py::test_tune_through_faults_gives_the_same_adapter",
})
MARKERS = {
    "slow": "over ~1.2 s on a quiet 2-core machine; deselect with -m 'not slow' for the fast tier",
    "subprocess": "starts a Python or server process",
    "server": "talks to an HTTP server (in process or not) that the test starts",
}
_SUBPROCESS_WORDS = ("subprocess.", "Popen(", "sys.executable")
_SERVER_WORDS = ("BackgroundServer", "start_server", "Server(", ".url", "srv.", "server.")


def _source(item: pytest.Item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)  # type: ignore[attr-defined]
    except (AttributeError, OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        family = item.nodeid.split("[", 1)[0].removeprefix("tests/")
        if family in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
        source = _source(item)
        fixtures = set(getattr(item, "fixturenames", ()))
        if any(word in source for word in _SUBPROCESS_WORDS):
            item.add_marker(pytest.mark.subprocess)
        if fixtures & {"server", "srv", "served"} or any(word in source for word in _SERVER_WORDS):
            item.add_marker(pytest.mark.server)


# ------------------------------------------------------------------------------------- serving in a subprocess


def free_port() -> int:
    """A TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_serve(args: list[str], *, port: int | None = None, stdout: int | None = None, new_session: bool = False,
                deadline_s: float = 180) -> tuple[subprocess.Popen, str]:
    """``craft-sdk serve --port PORT *args`` in a subprocess (the suite's thread count), up and answering
    /v1/health; returns (process, base URL). The one "start serve, poll health" helper of the suite."""
    import httpx

    port = port or free_port()
    cmd = [sys.executable, "-m", "craft_sdk.cli", "serve", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, env=suite_env(), stdout=subprocess.DEVNULL if stdout is None else stdout,
                            stderr=subprocess.PIPE, start_new_session=new_session)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + deadline_s
    while True:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)
