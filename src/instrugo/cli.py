"""The `instrugo` command line: parses flags into a stage's config, calls the stage, reports where output went.

Every stage command takes its flags from the fields of the stage's config dataclass, plus `--config
FILE.yaml` and `--preset NAME`; precedence is preset < YAML file < flags. Bad input ends with one line on
stderr naming the file, line and field, and exit status 2.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from instrugo.config import field_type, from_dict, load_yaml
from instrugo.runio import InputError

app = typer.Typer(help="Train language models to follow instructions with human feedback (InstructGPT on one CPU).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def build_config(config_cls: type, preset: str | None, file_values: dict[str, Any], source: str,
                 flags: dict[str, Any]):
    """preset < YAML file < command-line flags, each validated with its own source named in errors."""
    presets = getattr(config_cls, "presets", {})
    if preset is not None and preset not in presets:
        raise InputError("--preset", f"unknown preset '{preset}' (known: {', '.join(presets) or 'none'})")
    values = dict(presets.get(preset, {}))
    if file_values:
        from_dict(config_cls, {**values, **file_values}, source=source)  # errors name the file
        values.update(file_values)
    values.update({k: v for k, v in flags.items() if v is not None})
    return from_dict(config_cls, values, source="command line")


def stage_command(target: typer.Typer, name: str, config_cls: type, run: Callable[..., Any], help: str,
                  with_sections: bool = False, multi_process: bool = False) -> None:
    """Register `name` on `target` with one option per field of `config_cls`. With `with_sections`, the
    YAML file may also hold per-stage sections, passed on to `run` with the preset name. Only commands
    marked `multi_process` may run under a multi-process launch; the others would write the same files
    from every process."""
    parameters = [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", help="YAML file of settings (keys as the flags, with _).")),
        inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                          default=typer.Option(None, "--preset",
                                               help=f"Preset defaults: {', '.join(getattr(config_cls, 'presets', {})) or 'none'}.")),
    ]
    for field in dataclasses.fields(config_cls):
        kind = field_type(config_cls, field.name)
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{field.metadata.get('help', '')} [default: {shown}]"
        if kind is bool:
            annotation, declaration = Optional[bool], (f"{flag}/--no-{flag[2:]}",)
        elif typing.get_origin(kind) is list:
            annotation, declaration, text = Optional[str], (flag,), text + " (comma-separated)"
        else:
            annotation, declaration = Optional[kind], (flag,)
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                            default=typer.Option(None, *declaration, help=text, show_default=False)))

    def command(config_file: Path | None = None, preset: str | None = None, **flags: Any) -> None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size > 1 and not multi_process:
            raise InputError(name, f"runs in one process, not under a launch of {world_size} (WORLD_SIZE); only "
                                   "sft, rm, ppo and run train on several")
        file_values = load_yaml(config_file) if config_file is not None else {}
        source = str(config_file or "command line")
        if not with_sections:
            run(build_config(config_cls, preset, file_values, source, flags))
            return
        from instrugo.pipeline import config_sections

        top, sections = config_sections(file_values)
        run(build_config(config_cls, preset, top, source, flags), preset or "default", sections, source)

    command.__signature__ = inspect.Signature(parameters)  # typer reads the options from here
    command.__doc__ = help
    target.command(name, help=help)(command)


def _register() -> None:
    from instrugo.data.cli import app as data_app
    from instrugo.evaluate import EvalConfig, run_eval
    from instrugo.labelers import SimulateConfig, run_simulate
    from instrugo.labeling.cli import app as label_app
    from instrugo.pipeline import RunConfig, run_pipeline
    from instrugo.ppo import PPOConfig, run_ppo
    from instrugo.report import ReportConfig, run_report
    from instrugo.reward import RewardConfig, run_reward
    from instrugo.sample import SampleConfig, run_sample
    from instrugo.serve import ChatConfig, ServeConfig, run_chat, run_serve
    from instrugo.sft import SFTConfig, run_sft

    app.add_typer(data_app, name="data", help="The InstruGo dataset and your own data: stats, validate, export.")
    stage_command(app, "sft", SFTConfig, run_sft,
                  "Step 1: supervised fine-tuning on demonstrations (loss on response tokens only).",
                  multi_process=True)
    stage_command(app, "sample", SampleConfig, run_sample,
                  "Sample K responses per prompt from a policy as comparison tasks to rank.")
    stage_command(label_app, "simulate", SimulateConfig, run_simulate,
                  "Rank comparison tasks with the seeded pool of simulated labelers (noisy, like people).")
    app.add_typer(label_app, name="label", help="Rankings: the labeling web app, its admin side, and simulated labelers.")
    stage_command(app, "rm", RewardConfig, run_reward,
                  "Step 2: train the reward model on K-way rankings (all pairs of a prompt in one batch element).",
                  multi_process=True)
    stage_command(app, "ppo", PPOConfig, run_ppo,
                  "Step 3: PPO against the reward model with a per-token KL penalty; PPO-ptx with --ptx-coef.",
                  multi_process=True)
    stage_command(app, "eval", EvalConfig, run_eval,
                  "Generate on held-out prompts and score with the gold judge; writes eval.json.")
    stage_command(app, "report", ReportConfig, run_report,
                  "Write RUN_DIR/report.html (plots and tables) from eval.json and the stages' metrics.")
    stage_command(app, "chat", ChatConfig, run_chat,
                  "Chat with a policy in the terminal (an `instrugo run` directory: its newest policy).")
    stage_command(app, "serve", ServeConfig, run_serve,
                  "Serve a policy over HTTP: OpenAI's /v1/chat/completions (streaming, batched) and a chat page.")
    stage_command(app, "run", RunConfig, run_pipeline,
                  "The whole loop: SFT, then rounds of sample, label, RM and PPO; evaluation and report.",
                  with_sections=True, multi_process=True)


_register()


def main() -> None:
    try:
        app()
    except InputError as error:
        print(f"instrugo: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
