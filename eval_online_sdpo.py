"""Online SDPO with periodic evaluation: the continual-personalization experiment.

Per optimizer step: ``--interactions_per_step`` B training prompts are answered in one batched generation,
the simulated user (a persona) writes B follow-ups, and the policy is updated at once on the B tuples with
the SDPO signal log π(y|x,o) − log π(y|x). Every ``--eval_every`` interactions the current policy answers the
held-out prompts and one persona judge per style compares each answer with the untrained baseline's, in both
orders. ``--style_schedule`` switches the user's persona during training (the paper's preference flip, Fig. 4,
and sequential preferences, Fig. 6); every scheduled style is judged at every evaluation, so retention shows.
``--oracle`` first judges the in-context oracle (the same policy told the persona in a system message): the
reference line of what the model can do in context, which is what SDPO distills.

GPU (the reference setup, via the script):
    ./scripts/eval_online_sdpo.sh
The paper's figures (Table 5 settings): ./scripts/reproduce_paper.sh (FIGURE=fig4|fig5|fig6)
CPU, embedded model, rule-based user and judge, MT-Bench prompts (about 8 minutes on 2 cores):
    ./scripts/quickstart_cpu.sh
Direct:
    python eval_online_sdpo.py --model smollm2-135m-instruct --user_backend rule --judge_backend rule \
        --train_jsonl data/mtbench_prompts/train.jsonl --val_jsonl data/mtbench_prompts/validation.jsonl \
        --interactions_per_step 2 --style_schedule short:2,no_lists:2 --oracle --run_name demo --out_dir runs/demo
Every setting is a field of OnlineSDPOConfig (the learner), ParticipantsArguments (user and judges) or
OnlineRunConfig (data, personas, evaluation, outputs); a YAML file may hold any of them by field name, and the
command line wins over it:
    python eval_online_sdpo.py --config run.yaml --train_n 32
Resume an interrupted run (same out_dir, or a copy of it; its original settings are reused; .env is read):
    python eval_online_sdpo.py --resume --out_dir runs/demo

Outputs (all inside --out_dir; results JSON in --eval_dir, default --out_dir):
    <run_name>_<idx>.json               meta, eval_history, training_metrics (rewritten after every step)
    <run_name>_completions_<idx>.json   every evaluation's current and baseline completions
    <run_name>_completions.jsonl        the first 10 eval prompts per evaluation, truncated, for a quick look
    baseline_completions.json           the baseline's answers (kept for --resume)
    oracle_completions.json             with --oracle: the persona-prompted answers per style
    winrate.png                         win rate ± SE and coverage vs interactions, one line per judged style
    checkpoints/last/                   resume state (adapter or model, optimizer, step, RNG)
    checkpoints/step_<n>/               with --save_checkpoints, one per optimizer step
    run_state.json                      the arguments and file names of this run

After a crash (kill -9, Ctrl-C, an API outage): every interaction recorded in the results file up to the last
resume checkpoint is kept byte for byte by ``--resume``; interactions after it are recomputed from the
checkpoint's RNG state, so the resumed run equals an uninterrupted one. Files are replaced atomically (a
complete new file before the old one goes), and a checkpoint's previous version is kept until the new one is
complete. A run that failed before its first interaction can simply be started again.

Deliberate differences from the reference: batched interactions and evaluation generation; persona schedules;
the oracle line; everything under the run's directory; results written after every step; python/numpy/torch
seeded; the final evaluation uses --temperature; strict judge parsing with unparsed verdicts counted
(n_unparsed); the ties-as-half win rate stored.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time

from tqdm.auto import tqdm

from sdpo.chat.backends import BackendError
from sdpo.chat.policies import TrainingPolicy, load_policy, release
from sdpo.evaluation.diagnostics import collapse_diagnostics
from sdpo.evaluation.evaluation_helpers import (
    DataError,
    Prompt,
    as_conversation,
    average_chars,
    format_metrics_line,
    judge_every_style,
    load_split,
    request_text,
    seed_everything,
    write_completions_snapshot,
    write_json_atomic,
)
from sdpo.evaluation.oracle import oracle_answers
from sdpo.evaluation.plots import plot_winrate
from sdpo.learner.config import OnlineSDPOConfig
from sdpo.learner.updater import EmptyResponseError, OnlineSDPOUpdater
from sdpo.models.generation import SamplingParams
from sdpo.models.model_loading import ModelLoadError
from sdpo.models.vllm_engines import require_vllm
from sdpo.models.vllm_server import VLLMServerPolicyEngine
from sdpo.online import distributed
from sdpo.online.config import SYSTEM_PROMPTS, OnlineArguments, check_world_size, parse_arguments
from sdpo.online.preflight import run_preflight
from sdpo.online.run_state import (
    RESUME_TAG,
    ResumePoint,
    RunFiles,
    kept_history,
    nothing_pending,
    read_json,
    resume_point,
    start_or_resume,
)
from sdpo.personas.participants import build_participants, check_remote_backends
from sdpo.utils.command_line import UsageError, mask_secrets
from sdpo.utils.env_file import load_project_env
from sdpo.utils.tracking import Tracker

logger = logging.getLogger("eval_online_sdpo")

TEXT_PREVIEW_CHARS = 300


def learner_config(arguments: OnlineArguments, files: RunFiles) -> OnlineSDPOConfig:
    """The learner's settings with the run's checkpoint folder (and a checkpoint per step with --save_checkpoints)."""
    every = 1 if arguments.run.save_checkpoints else arguments.learner.checkpoint_every_n_steps
    return dataclasses.replace(arguments.learner, checkpoint_dir=str(files.checkpoints), checkpoint_every_n_steps=every)


def policy_conversation(prompt: Prompt, system_prompt: str | None) -> list[dict]:
    """The policy's context for one prompt: its conversation, after the run's system message when one is set."""
    conversation = as_conversation(prompt)
    if not system_prompt or conversation[0]["role"] == "system":
        return conversation
    return [{"role": "system", "content": system_prompt}, *conversation]


class OnlineRun:
    """One online SDPO run: baseline, optional oracle, batched interactions, evaluations, results files."""

    def __init__(self, arguments: OnlineArguments, files: RunFiles, previous: dict | None):
        self.arguments, self.learner, self.run = arguments, arguments.learner, arguments.run
        self.files = files
        self.schedule = self.run.schedule
        self.participants_config = arguments.participants_config()
        self.system_prompt = SYSTEM_PROMPTS[self.run.system_prompt]
        self.eval_sampling = SamplingParams(
            max_new_tokens=self.run.eval_max_new_tokens, temperature=self.learner.temperature, top_p=1.0
        )
        self.previous = previous
        self.tracker = Tracker()
        self.parallel = distributed.current()

    # ------------------------------------------------------------------ set-up

    def conversations(self, prompts: list[Prompt]) -> list[list[dict]]:
        return [policy_conversation(p, self.system_prompt) for p in prompts]

    def baseline_completions(self, eval_prompts: list[str], policy) -> list[str]:
        """The baseline's answers: loaded on resume, else generated by --baseline_model or the untrained policy."""
        files, run, learner = self.files, self.run, self.learner
        if files.baseline.is_file():
            stored = json.loads(files.baseline.read_text())
            if stored["prompts"] == eval_prompts:
                return stored["completions"]
            raise DataError(f"{files.baseline} was made for other eval prompts; start a new run")
        seed_everything(run.seed)
        separate = bool(run.baseline_model) and run.baseline_model != learner.model_name_or_path
        if separate:
            policy = load_policy(
                run.baseline_model,
                dtype=learner.torch_dtype,
                device=learner.device,
                batch_size=learner.generation_batch_size,
            )
        texts = distributed.answer_sharded(
            self.parallel,
            policy,
            self.conversations(eval_prompts),
            self.eval_sampling,
            batch_size=learner.generation_batch_size,
            label="baseline",
        )
        if separate:
            release(policy)
        del policy
        if self.parallel.is_main_process:
            write_json_atomic(
                files.baseline,
                {
                    "model": run.baseline_model or learner.model_name_or_path,
                    "prompts": eval_prompts,
                    "completions": texts,
                },
            )
        logger.info("baseline: %d completions, mean %.0f chars", len(texts), average_chars(texts))
        return texts

    def introductions(self, n_interactions: int) -> dict[str, int]:
        """Interactions done when each judged style gets its baseline: 0 for all under --style_baseline base;
        under ``introduced`` a scheduled style entering after the first update has its switch point."""
        batch = self.run.interactions_per_step
        introduced = {style: 0 for style in self.participants_config.judge_styles}
        if self.run.style_baseline == "introduced":
            seen = {self.schedule.segments[0][0]}
            for point, style in self.schedule.switch_points(n_interactions):
                if style not in seen and point >= batch:  # within the first update the policy is still the base
                    introduced[style] = point
                seen.add(style)
        return introduced

    def stored_style_baselines(self, records: dict, base: list[str]) -> dict[str, list[str]]:
        """Every style's baseline answers known so far: the base answers, and those taken at introductions."""
        baselines = {}
        for style in self.participants_config.judge_styles:
            record = records.get(style)
            if record is None and self.introductions(self.n_train)[style] == 0:
                records[style] = {"style": style, "interaction": 0, "step": 0, "file": self.files.baseline.name}
                baselines[style] = base
            elif record is not None:
                path = self.files.out_dir / record["file"]
                baselines[style] = base if record["interaction"] == 0 else read_json(path, "completions")["completions"]
        return baselines

    def take_style_baselines(self, policy, results: dict, interaction: int, step: int) -> list[str]:
        """Under --style_baseline introduced: the current policy answers the eval prompts once for every style
        introduced by the next update; those answers become the style's baseline from now on."""
        n = results["meta"]["n_train_prompts"]
        batch = self.run.interactions_per_step
        new = [
            style
            for style, point in self.introductions(n).items()
            if style not in self.baselines and interaction <= point < interaction + batch
        ]
        if not new:
            return []
        texts = distributed.answer_sharded(
            self.parallel,
            policy,
            self.conversations(self.eval_prompts),
            self.eval_sampling,
            batch_size=self.learner.generation_batch_size,
            label="baseline at switch",
        )
        for style in new:
            path = self.files.style_baseline(style)
            if self.parallel.is_main_process:
                write_json_atomic(
                    path,
                    {
                        "style": style,
                        "interaction": interaction,
                        "step": step,
                        "prompts": self.eval_prompts,
                        "completions": texts,
                    },
                )
            record = {"style": style, "interaction": interaction, "step": step, "file": path.name}
            results["meta"]["style_baselines"][style] = record
            self.pending["baselines"].append(record)
            self.baselines[style] = texts
            logger.info(
                "baseline of %s: the policy after %d interactions (step %d), mean %.0f chars",
                style,
                interaction,
                step,
                average_chars(texts),
            )
        return new

    def oracle_metrics(self, policy, participants, eval_prompts: list[str], baseline: list[str]) -> dict:
        """The in-context oracle judged against the baseline, per judged style (stored answers reused on resume)."""
        styles = list(participants.judges)
        if self.files.oracle.is_file():
            answers = json.loads(self.files.oracle.read_text())["completions"]
        else:
            sampling = self.eval_sampling
            shard, _ = oracle_answers(
                policy,
                self.parallel.shard(eval_prompts),
                styles,
                sampling,
                batch_size=self.learner.generation_batch_size,
                seed=self.run.seed,
                system_prompt=self.system_prompt,
            )
            answers = {style: self.parallel.gather(shard[style]) for style in styles}
            if self.parallel.is_main_process:
                write_json_atomic(self.files.oracle, {"prompts": eval_prompts, "completions": answers})
        return distributed.on_main_then_shared(
            self.parallel, lambda: self.judge_oracle(participants, eval_prompts, answers, baseline)
        )

    def judge_oracle(
        self, participants, eval_prompts: list[str], answers: dict[str, list[str]], baseline: list[str]
    ) -> dict:
        metrics = {}
        for style, texts in answers.items():
            metrics[style] = judge_every_style(
                {style: participants.judges[style]}, eval_prompts, texts, baseline, seed=self.run.seed, label="oracle"
            )[style]
            metrics[style]["avg_completion_chars"] = average_chars(texts)
        return metrics

    # ------------------------------------------------------------------ the run

    def execute(self) -> dict:
        run, learner, files = self.run, self.learner, self.files
        config = self.participants_config
        config.validate()
        colocated = learner.use_vllm and run.vllm_mode == "colocate"
        require_vllm([flag for flag, on in (("--use_vllm", colocated), ("--user_vllm", config.uses_vllm)) if on])
        policy_engine = None
        if learner.use_vllm and run.vllm_mode == "server":
            # A server that cannot serve the policy is one line before any model loads.
            policy_engine = VLLMServerPolicyEngine(
                run.vllm_server_url, registers_adapters=self.parallel.is_main_process
            )
            policy_engine.check()
        # Remote and rule participants cost nothing to build: built first, a bad key fails before the model loads.
        participants = build_participants(config) if config.user_backend not in ("hf", "vllm") else None
        if participants is not None:
            check_remote_backends(participants)
        seed_everything(run.seed)
        resume = resume_point(files, self.previous)
        checkpoint, done = resume.checkpoint, resume.interactions_done
        updater = OnlineSDPOUpdater(
            learner_config(self.arguments, files), resume_from=checkpoint, policy_engine=policy_engine
        )

        train_prompts = load_split(
            run.train_jsonl,
            updater.tokenizer,
            run.train_n,
            max_prompt_tokens=run.max_prompt_tokens,
            seed=run.seed,
            label="train",
        )
        eval_prompts = load_split(
            run.val_jsonl,
            updater.tokenizer,
            run.eval_n,
            max_prompt_tokens=run.max_prompt_tokens,
            seed=run.seed,
            label="eval",
        )
        if not eval_prompts or not train_prompts:
            raise DataError(
                f"no prompts left after filtering ({len(train_prompts)} train, {len(eval_prompts)} eval); check "
                "the files and --max_prompt_tokens"
            )
        policy = TrainingPolicy(updater)
        self.n_train = len(train_prompts)
        baseline = self.baseline_completions(eval_prompts, policy)
        if participants is None:
            participants = build_participants(config)
        results = self.initial_results(participants, train_prompts, eval_prompts, resume)
        self.baselines = self.stored_style_baselines(results["meta"]["style_baselines"], baseline)
        if run.oracle and "oracle" not in results["meta"]:
            results["meta"]["oracle"] = self.oracle_metrics(policy, participants, eval_prompts, baseline)
            self.save(results)
        if run.preflight and "preflight" not in results["meta"]:
            prompts = train_prompts[: run.preflight]
            results["meta"]["preflight"] = run_preflight(
                updater,
                participants,
                self.schedule.styles,
                self.conversations(prompts),
                [request_text(p) for p in prompts],
                seed=run.seed,
            )
            for check in results["meta"]["preflight"].values():
                print(check["verdict"])
            self.save(results)
        if run.preflight_only:
            return results
        if checkpoint is None:
            # Training draws from the same stream whether the baseline was generated now or read from disk.
            seed_everything(run.seed)
            if run.eval_at_start:
                self.record_evaluation(updater, policy, participants, eval_prompts, baseline, results, 0)
        self.tracker = Tracker.start(
            run.report_to if self.parallel.is_main_process else "none",
            project=run.wandb_project,
            name=run.run_name,
            config=self.arguments.to_dict(),
            directory=str(files.out_dir),
            run_id=f"{run.run_name}-{files.results.stem}",
        )
        self.train_and_evaluate(updater, policy, participants, train_prompts, eval_prompts, baseline, results, done)
        return results

    def initial_results(self, participants, train_prompts, eval_prompts, resume: ResumePoint) -> dict:
        run, learner = self.run, self.learner
        # Every setting by field name, then what the run derived from them.
        meta = {
            # Where the run lives and how it was started are not what it computes: a resumed (or copied) run's meta
            # equals an uninterrupted one's.
            "settings": {
                name: value
                for name, value in self.arguments.to_dict().items()
                if name not in ("resume", "out_dir", "eval_dir")
            },
            "judged_styles": list(self.participants_config.judge_styles),
            "style_segments": [list(segment) for segment in self.schedule.segments] if run.style_schedule else None,
            "switch_points": [list(point) for point in self.schedule.switch_points(len(train_prompts))],
            "n_train_prompts": len(train_prompts),
            "n_eval_prompts": len(eval_prompts),
            "judge_label": participants.judge_label,
            "user_label": participants.user_label,
            "baseline": run.baseline_model or learner.model_name_or_path,
            "n_skipped": 0,
            "world_size": self.parallel.world_size,
            # Per judged style: the interaction its baseline answers were taken at, and their file.
            "style_baselines": {},
        }
        results = {"meta": meta, "eval_history": [], "training_metrics": []}
        self.eval_prompts = eval_prompts
        self.completions_log: list[dict] = []
        self.pending = nothing_pending()
        done = resume.interactions_done
        meta["resume_checkpoint_interactions"] = done
        previous = self.previous or {"meta": {}, "training_metrics": [], "eval_history": []}
        for stored in ("oracle", "preflight"):
            if stored in previous["meta"]:
                meta[stored] = previous["meta"][stored]
        records = previous["training_metrics"]
        if records and records[-1]["interaction"] > done:
            logger.warning(
                "interactions %d-%d came after the last resume checkpoint (--resume_every %d) and are done again",
                done + 1,
                records[-1]["interaction"],
                run.resume_every,
            )
        completions = (
            json.loads(self.files.completions.read_text()) if self.previous and self.files.completions.is_file() else []
        )
        pending = resume.pending or {}
        results["training_metrics"] = kept_history(records, pending.get("records", []), done)
        # Without a checkpoint everything is done again, the evaluation at interaction 0 included.
        results["eval_history"] = (
            kept_history(previous["eval_history"], pending.get("evaluations", []), done) if done else []
        )
        taken = [*previous["meta"].get("style_baselines", {}).values(), *pending.get("baselines", [])]
        meta["style_baselines"] = {
            record["style"]: record
            for record in kept_history(taken, [], done)
            if record["style"] in meta["judged_styles"]
        }
        self.completions_log = kept_history(completions, pending.get("completions", []), done) if done else []
        meta["n_skipped"] = sum(1 for m in results["training_metrics"] if m.get("skipped"))
        if done:
            logger.info("resumed at interaction %d/%d", done, len(train_prompts))
        return results

    def save(self, results: dict) -> None:
        if not self.parallel.is_main_process:
            return
        write_json_atomic(self.files.results, results)
        write_json_atomic(self.files.completions, self.completions_log)
        write_completions_snapshot(self.files.snapshot, self.completions_log, self.eval_prompts)
        meta = results["meta"]
        if results["eval_history"] or meta.get("oracle") or meta.get("preflight"):
            plot_winrate(
                results["eval_history"],
                self.files.plot,
                styles=list(self.participants_config.judge_styles),
                oracle=meta.get("oracle"),
                switch_points=[tuple(point) for point in meta["switch_points"]],
                min_decided=self.run.min_decided,
                title=f"{self.run.run_name}: {self.learner.model_name_or_path}",
                baseline_at={style: record["interaction"] for style, record in meta["style_baselines"].items()},
                preflight=meta.get("preflight"),
            )

    def evaluate(self, policy, participants, eval_prompts, interaction: int, step: int) -> tuple[dict, list[str]]:
        """Judge the current policy with every style that has a baseline, each against its own; returns (history
        entry, completions). A style introduced later is absent from the entries before its introduction. Under
        several processes each answers its share of the prompts; the main process judges, and every process gets
        the verdicts (all hold the same results; only the main one writes them)."""
        started = time.perf_counter()
        current = distributed.answer_sharded(
            self.parallel,
            policy,
            self.conversations(eval_prompts),
            self.eval_sampling,
            batch_size=self.learner.generation_batch_size,
            label="eval generation",
        )
        gen_time = time.perf_counter() - started

        def judge_introduced_styles() -> dict:
            per_style = {}
            for style, judge in participants.judges.items():
                if style in self.baselines:
                    per_style.update(
                        judge_every_style(
                            {style: judge},
                            eval_prompts,
                            current,
                            self.baselines[style],
                            seed=self.run.seed,
                            label=f"interaction {interaction}",
                        )
                    )
            return per_style

        per_style = distributed.on_main_then_shared(self.parallel, judge_introduced_styles)
        primary = self.participants_config.judge_styles[0]
        entry = {
            **per_style[primary],
            **{f"secondary_{style}": metrics for style, metrics in per_style.items() if style != primary},
        }
        entry.update(
            step=step,
            interaction=interaction,
            eval_gen_time_s=round(gen_time, 1),
            avg_completion_chars=average_chars(current),
        )
        return entry, current

    def interact(
        self, updater, participants, prompts: list[Prompt], first: int
    ) -> tuple[list, list[str], list[str], float, float]:
        """One batch of interactions: responses (one generation call) and follow-ups (one call per persona)."""
        if not prompts:  # this process's share of a short last batch
            return [], [], [], 0.0, 0.0
        started = time.perf_counter()
        responses = updater.generate(self.conversations(prompts))
        gen_time = time.perf_counter() - started
        styles = [self.schedule.style_at(first + offset) for offset in range(len(prompts))]
        follow_ups = [""] * len(prompts)
        started = time.perf_counter()
        for style in dict.fromkeys(styles):
            rows = [i for i, s in enumerate(styles) if s == style]
            replies = participants.simulators[style].generate_feedback(
                [request_text(prompts[i]) for i in rows], [responses[i].text for i in rows]
            )
            for row, reply in zip(rows, replies):
                follow_ups[row] = reply
        return responses, follow_ups, styles, gen_time, time.perf_counter() - started

    def train_and_evaluate(
        self, updater, policy, participants, train_prompts, eval_prompts, baseline, results, done: int
    ) -> None:
        run, parallel = self.run, self.parallel
        n = len(train_prompts)
        self.save(results)
        progress = tqdm(total=n, initial=done, desc="interactions", unit="it", disable=not parallel.is_main_process)
        for batch_first in range(done, n, run.interactions_per_step):
            batch = train_prompts[batch_first : batch_first + run.interactions_per_step]
            last = batch_first + len(batch)
            # This process's contiguous share of the batch (all of it in one process).
            offsets = parallel.shard(list(range(len(batch))))
            first = batch_first + (offsets[0] if offsets else 0)
            prompts = [batch[offset] for offset in offsets]
            distributed.seed_step(parallel, run.seed, batch_first)
            responses, follow_ups, styles, gen_time, sim_time = self.interact(updater, participants, prompts, first)
            if run.debug_first_example and first == 0:
                print(
                    f"[debug] first interaction ({styles[0]}): {request_text(prompts[0])[:500]!r} → "
                    f"{responses[0].text[:500]!r}\n[debug] follow-up: {follow_ups[0]!r}"
                )
            trainable, skipped = [], {}
            for row, response in enumerate(responses):
                try:
                    updater.completion_ids(response)
                    trainable.append(row)
                except EmptyResponseError as error:
                    skipped[row] = str(error)
                    logger.warning("interaction %d skipped: %s", first + row + 1, error)
            step_metrics = {}
            if parallel.sum(len(trainable)):  # every process takes part in the step, with an empty share too
                step_metrics = updater.train_step_batch(
                    [policy_conversation(prompts[i], self.system_prompt) for i in trainable],
                    [responses[i] for i in trainable],
                    [follow_ups[i] for i in trainable],
                )
                self.tracker.log(step_metrics, step=updater.step, prefix="train")
            records = []
            for row, prompt in enumerate(prompts):
                record = {"step": updater.step, "skipped": skipped[row]} if row in skipped else dict(step_metrics)
                record.update(
                    interaction=first + row + 1,
                    style=styles[row],
                    batch_size=len(batch),
                    gen_time_s=round(gen_time, 2),
                    sim_time_s=round(sim_time, 2),
                    prompt=request_text(prompt)[:TEXT_PREVIEW_CHARS],
                    response=responses[row].text[:TEXT_PREVIEW_CHARS],
                    feedback=follow_ups[row][:TEXT_PREVIEW_CHARS],
                )
                records.append(record)
            records = parallel.gather(records)  # every process's records, in interaction order
            results["training_metrics"].extend(records)
            self.pending["records"].extend(records)
            results["meta"]["n_skipped"] += sum(1 for record in records if "skipped" in record)
            progress.update(len(batch))
            progress.set_postfix(loss=f"{step_metrics.get('loss', float('nan')):.4f}", style=records[-1]["style"])
            introduced = self.take_style_baselines(policy, results, last, updater.step) if last < n else []
            if introduced or (run.eval_every > 0 and last // run.eval_every > batch_first // run.eval_every):
                # A style enters with a point at its own introduction (≈ 50%: the policy against itself).
                self.record_evaluation(updater, policy, participants, eval_prompts, baseline, results, last)
            crossed_resume_point = run.resume_every > 0 and last // run.resume_every > batch_first // run.resume_every
            if crossed_resume_point or last == n:
                # Checkpoint first, then the results that name it: a crash in between loses nothing, since the
                # checkpoint carries what was recorded since the previous one.
                updater.save_checkpoint(RESUME_TAG, extra_state={"interactions_done": last, "pending": self.pending})
                results["meta"]["resume_checkpoint_interactions"] = last
                self.pending = nothing_pending()
            self.save(results)
        progress.close()
        if not results["eval_history"] or results["eval_history"][-1]["interaction"] != n:
            self.record_evaluation(updater, policy, participants, eval_prompts, baseline, results, n)
        self.save(results)

    def record_evaluation(
        self, updater, policy, participants, eval_prompts, baseline, results, interaction: int
    ) -> None:
        debug = self.run.debug_first_example and not results["eval_history"]
        entry, current = self.evaluate(policy, participants, eval_prompts, interaction, updater.step)
        entry.update(collapse_diagnostics(updater, self.conversations(eval_prompts), current))
        if debug:
            judge = participants.judges[results["meta"]["judged_styles"][0]]
            if judge.last_raw_outputs:
                print(f"[debug] judge raw AB output on eval prompt 0:\n{judge.last_raw_outputs[0]['ab'][:1000]}")
        completions = {"step": updater.step, "interaction": interaction, "current": current, "baseline": baseline}
        results["eval_history"].append(entry)
        self.completions_log.append(completions)
        self.pending["evaluations"].append(entry)
        self.pending["completions"].append(completions)
        self.tracker.log(entry, step=updater.step, prefix="eval")


def print_summary(results: dict) -> None:
    """Final win rate per judged style next to its in-context oracle, so a reader sees at a glance whether the
    model can follow the persona at all (an oracle near 50% means there is nothing for SDPO to distill)."""
    if not results["eval_history"]:
        return
    last = results["eval_history"][-1]
    oracle = results["meta"].get("oracle") or {}
    print(f"after {last['interaction']} interactions (step {last['step']}):")
    primary, *others = results["meta"]["judged_styles"]
    for style in (primary, *others):
        metrics = last if style == primary else last.get(f"secondary_{style}", {})
        line = f"  {format_metrics_line(metrics, style)}"
        if style in oracle:
            line += f" || oracle {format_metrics_line(oracle[style], style).split(': ', 1)[1]}"
        print(line)


def main(argv=None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    try:
        load_project_env()
        arguments = parse_arguments(argv, description=__doc__)
        # The main process chooses (or finds) the run's files; every process continues the same run.
        arguments, files, previous = distributed.on_main_then_shared(
            distributed.current(), lambda: start_or_resume(arguments)
        )
        check_world_size(arguments)  # a resumed run's stored settings against this launch
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    online_run = OnlineRun(arguments, files, previous)
    try:
        results = online_run.execute()
    except (DataError, ModelLoadError, BackendError, ValueError, FileNotFoundError) as error:
        print(f"error: {mask_secrets(str(error))}", file=sys.stderr)
        if files.results.is_file():
            print(
                f"results so far: {files.results}; continue with: python eval_online_sdpo.py --resume --out_dir "
                f"{files.out_dir}",
                file=sys.stderr,
            )
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted; finished interactions are in {files.results}; continue with: python eval_online_sdpo.py "
            f"--resume --out_dir {files.out_dir}",
            file=sys.stderr,
        )
        return 130
    finally:
        online_run.tracker.finish()
    if not online_run.parallel.is_main_process:
        return 0
    print_summary(results)
    print(f"results: {files.results}\nplot: {files.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
