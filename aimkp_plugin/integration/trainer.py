"""Touch point: LLaMA-Factory's SFT trainer (``train.sft.workflow.CustomSeq2SeqTrainer``).

With ``aimkp: true`` the trainer's ``training_step`` runs the AimKP step instead of one forward/backward:

- sample identity: each training sample's index in LLaMA-Factory's final train dataset (stable across epochs,
  shuffling and resume), carried through the collator as ``aimkp_index``; a fingerprint of its token ids matches
  samples when a saved state is restored;
- the step computes the gradient itself (token-weighted over the whole optimizer step: all micro-batches, all ranks);
  under DDP it writes ``.grad`` and all-reduces it at the synchronising micro-step instead of relying on DDP hooks;
  under DeepSpeed it hands the gradient to the engine's own backward (:mod:`.engines`; ZeRO-3 on the gathered
  model, :mod:`.zero3`); the filtering decision uses each sample's own gradients, before any reduction;
- clipping, the optimizer and the scheduler then run as usual.

With ``cmkp`` evaluation data and ``predict_with_generate`` (with or without AimKP), evaluation also reports the
keyphrase metrics (:mod:`.evaluation`). Otherwise the subclass behaves exactly like LLaMA-Factory's trainer.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from ..checks import DEEPSPEED_STAGES
from ..config import AimkpArguments, AimkpConfigError
from ..families import GenericFamily, ModelFamily, family_for
from ..families.base import attention_mask_dtype
from ..method.family_interface import FastStepUnsupportedError
from ..method.fast_layout import FastStepLayout, fast_step_layout, resolve_share_prefix
from ..method.fast_step import fast_batch_step
from ..method.step import reference_sample_step
from ..method.types import AUTO_BUFFER, IGNORE_INDEX, SampleInputs, SampleOutcome, StepConfig
from . import patching
from .args import active_arguments
from .batches import BatchSplitter
from .callback import AimkpCallback
from .engines import distributed, engine_gradients
from .evaluation import PREDICTIONS_FOLDER, KeyphraseMetrics, keyphrase_evaluation
from .zero3 import full_bytes, is_partitioned, size_words, trained_parameters_to_one_dtype


# LLaMA-Factory's trainer imports its SFT workflow, whose patch (at the end of this module) needs this module whole
patching.hold_patches()
from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer  # noqa: E402


logger = logging.getLogger("llamafactory.aimkp")
INDEX_COLUMN = "aimkp_index"


def sample_fingerprints(dataset: Any) -> list[str]:
    """A short hash of each sample's token ids (and image paths when the dataset keeps them)."""
    ids_column = dataset["input_ids"]
    images = dataset["images"] if "images" in dataset.column_names else [None] * len(ids_column)
    fingerprints = []
    for ids, image in zip(ids_column, images, strict=True):
        digest = hashlib.sha1(repr((list(ids), image)).encode())
        fingerprints.append(digest.hexdigest()[:16])
    return fingerprints


class IndexPassingCollator:
    """Wraps a collator: takes ``aimkp_index`` out of each feature and returns it as a tensor in the batch."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        indices = [feature.pop(INDEX_COLUMN, None) for feature in features]
        batch = self.collator(features)
        if all(index is not None for index in indices):
            batch[INDEX_COLUMN] = torch.tensor(indices, dtype=torch.long)
        return batch

    def __getattr__(self, name: str) -> Any:
        return getattr(self.collator, name)


def step_config(arguments: AimkpArguments) -> StepConfig:
    """The step's settings and the fast step's knobs from a run's AimKP arguments (0 there means automatic)."""
    return StepConfig(
        modalities=arguments.aimkp_modalities,
        thresholds=arguments.threshold,
        filtering=arguments.aimkp_filter,
        progressive=arguments.aimkp_progressive,
        max_tokens_per_forward=arguments.aimkp_fast_max_tokens or None,
        max_buffer_bytes=(
            AUTO_BUFFER if arguments.aimkp_fast_buffer_mb == "auto" else arguments.aimkp_fast_buffer_mb * 2**20 or None
        ),
        share_prefix=arguments.share_prefix,
    )


def sharing_words(share_from: float | None) -> str:
    """How the fast step treats the text copies' shared prefix, from :func:`resolve_share_prefix`'s answer."""
    if share_from is None:
        return "computed per copy"
    return "computed once" if share_from == 0 else f"computed once where over {share_from:g} of a pair"


class AimkpSeq2SeqTrainer(CustomSeq2SeqTrainer):
    """LLaMA-Factory's ``CustomSeq2SeqTrainer`` that runs the AimKP step when the run's config has ``aimkp: true``
    (and is exactly LLaMA-Factory's trainer otherwise)."""

    def __init__(self, *args: Any, aimkp_arguments: AimkpArguments | None = None, **kwargs: Any) -> None:
        """``aimkp_arguments``: the run's AimKP options (the patched workflow passes the ones its config held);
        None or ``aimkp: false`` is LLaMA-Factory's trainer, with the keyphrase evaluation and the projector's
        learning rate where asked for."""
        self.aimkp = aimkp_arguments if aimkp_arguments is not None and aimkp_arguments.aimkp else None
        self.aimkp_projector_lr = aimkp_arguments.aimkp_projector_lr if aimkp_arguments is not None else None
        self.aimkp_callback: AimkpCallback | None = None
        if self.aimkp is not None and kwargs.get("train_dataset") is not None:
            self._aimkp_index_samples(kwargs)
        metrics = self._aimkp_keyphrase_metrics(kwargs)
        super().__init__(*args, **kwargs)
        if self.aimkp is not None or self.aimkp_projector_lr is not None:
            self._aimkp_one_trained_dtype()
        if metrics is not None:
            metrics.predictions_file = self._aimkp_predictions_file
        if self.aimkp_callback is not None:
            self._aimkp_prepare_step()  # reads modules and names only: under ZeRO-3 the weights are partitioned here

    def _aimkp_one_trained_dtype(self) -> None:
        """Under ZeRO-3 in bf16, the adapter's float32 weights to the trained projector's bf16, before DeepSpeed
        builds its optimizer (:func:`~.zero3.trained_parameters_to_one_dtype`)."""
        cast = trained_parameters_to_one_dtype(self.accelerator.unwrap_model(self.model))
        if cast:
            logger.info(
                f"aimkp-plugin: under ZeRO-3 {len(cast)} trained parameters (the adapter's) are cast to the dtype in "
                "which ZeRO-3 holds the model, as DeepSpeed's stage-3 optimizer takes one dtype across all trained "
                "parameters; its master copies stay float32 (docs/engines.md)."
            )

    def _aimkp_index_samples(self, kwargs: dict[str, Any]) -> None:
        """Give every training sample its index (a dataset column the collator turns into a batch tensor), and the
        callback that holds the curriculum of those indices."""
        train_dataset = kwargs["train_dataset"]
        fingerprints = sample_fingerprints(train_dataset)
        kwargs["train_dataset"] = train_dataset.add_column(INDEX_COLUMN, list(range(len(fingerprints))))
        kwargs["data_collator"] = IndexPassingCollator(kwargs["data_collator"])
        self.aimkp_callback = AimkpCallback(self.aimkp, fingerprints)
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.aimkp_callback]

    def _aimkp_keyphrase_metrics(self, kwargs: dict[str, Any]) -> KeyphraseMetrics | None:
        """With ``cmkp`` evaluation data and generation keys: the keyphrase metrics in place of ``compute_metrics``."""
        self.aimkp_generation: dict[str, Any] | None = None
        self.aimkp_eval_prefix: str | None = None
        if not keyphrase_evaluation() or kwargs.get("gen_kwargs") is None:
            return None
        self.aimkp_generation = dict(kwargs["gen_kwargs"])
        tokenizer = kwargs.get("processing_class", kwargs.get("tokenizer"))
        metrics = KeyphraseMetrics(tokenizer, kwargs.get("compute_metrics"))
        kwargs["compute_metrics"] = metrics
        return metrics

    def _aimkp_prepare_step(self) -> None:
        """Everything the step needs from the built model: the engine checked, the family, the batch splitter, the
        step's settings, the reference step's mask and removal, and the fast step's layout."""
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if plugin is not None and plugin.zero_stage not in DEEPSPEED_STAGES:
            raise AimkpConfigError(
                f"aimkp: true supports DeepSpeed ZeRO stages {', '.join(map(str, DEEPSPEED_STAGES))}, not "
                f"ZeRO-{plugin.zero_stage} (README, Supported engines). Use a ZeRO-2 or ZeRO-3 config, or DDP."
            )
        core = self.accelerator.unwrap_model(self.model)
        if any(is_partitioned(parameter) for parameter in core.parameters()):
            logger.info(
                "aimkp-plugin: under ZeRO-3 the AimKP step gathers the whole model on each rank "
                f"({size_words(full_bytes(list(core.parameters())))}) while it runs (docs/engines.md)."
            )
        self.aimkp_family = self._aimkp_family(core)
        self.aimkp_splitter = BatchSplitter(core.config, self.processing_class, self.aimkp_family)
        self.aimkp_config = step_config(self.aimkp)
        self.aimkp_step_tokens = 0.0
        compute_dtype = torch.bfloat16 if self.args.bf16 else torch.float32
        self.aimkp_mask_dtype = attention_mask_dtype(core, compute_dtype)
        self.aimkp_reference_mask = self.aimkp_family.reference_mask_builder(core)
        self.aimkp_removal = self.aimkp_family.token_removal(core)
        self.aimkp_keys = self.aimkp_family.key_hiding(core)
        self.aimkp_layout = self._aimkp_fast_layout()

    @staticmethod
    def _aimkp_family(model: Any) -> ModelFamily:
        """The model's family from the table. A run through ``llamafactory-cli`` never gets here with an unknown model
        type (it stops before the model loads); a trainer built otherwise gets the 1-D fallback, with a warning."""
        family = family_for(model.config)
        if isinstance(family, GenericFamily):
            logger.warning(
                f"aimkp-plugin: no image grid layout is known for model_type {family.name}; image copies use the "
                "1-D fallback (every γ-th image token)."
            )
        return family

    def _aimkp_fast_layout(self) -> FastStepLayout | None:
        """The fast step's view of the model, or None (with one warning) when only the reference step fits."""
        if self.aimkp.aimkp_impl != "fast":
            return None
        try:
            if not self.aimkp_family.has_fast_step:
                raise FastStepUnsupportedError(f"model_type {self.aimkp_family.name} has no fast AimKP step")
            layout = fast_step_layout(self.accelerator.unwrap_model(self.model), self.aimkp_family)
        except FastStepUnsupportedError as err:
            logger.warning(
                f"aimkp-plugin: aimkp_impl: fast cannot run this model ({err}); the reference step runs instead "
                "(the same updates, slower). Set aimkp_impl: reference to silence this warning."
            )
            return None
        device = layout.model.get_input_embeddings().weight.device
        try:
            share = resolve_share_prefix(layout, self.aimkp.share_prefix, device)
        except FastStepUnsupportedError as err:
            raise AimkpConfigError(str(err)) from None
        logger.info(
            f"aimkp-plugin: the fast AimKP step runs for the {layout.family.name} family "
            f"({len(layout.linear_modules)} hooked Linear layers, "
            f"{len(layout.vision_parameters)} trained vision-side tensors; the text copies' shared prefix "
            f"{sharing_words(share)}, aimkp_fast_share_prefix: "
            f"{self.aimkp.aimkp_fast_share_prefix}{'' if layout.dropout is None else ', dropout: ' + layout.dropout})."
        )
        return layout

    def create_optimizer(self, *args: Any, **kwargs: Any) -> Any:
        """LLaMA-Factory's optimizer; with ``aimkp_projector_lr`` the projector's trained parameters move into
        parameter groups of their own at that learning rate (each keeping its weight decay), before any step."""
        fresh = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if fresh and self.aimkp_projector_lr is not None:
            core = self.accelerator.unwrap_model(self.model)
            projector = family_for(core.config).projector
            in_projector = {id(p) for name, p in core.named_parameters() if f".{projector}." in f".{name}"}
            moved_groups = []
            for group in optimizer.param_groups:
                moved = [p for p in group["params"] if id(p) in in_projector]
                if moved:
                    group["params"] = [p for p in group["params"] if id(p) not in in_projector]
                    moved_groups.append({**group, "params": moved, "lr": self.aimkp_projector_lr})
            if not moved_groups:
                raise ValueError(
                    f"aimkp_projector_lr is set, but no trained parameter belongs to the projector ({projector}). "
                    f"Train it (additional_target: {projector}, or freeze_multi_modal_projector: false), or remove "
                    "aimkp_projector_lr."
                )
            for group in moved_groups:
                optimizer.add_param_group(group)
            count = sum(len(group["params"]) for group in moved_groups)
            logger.info(f"aimkp-plugin: {count} projector tensors train at lr {self.aimkp_projector_lr}.")
        return optimizer

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        if self.aimkp_callback is not None and resume_from_checkpoint:
            from transformers.trainer_utils import get_last_checkpoint

            path = resume_from_checkpoint
            if isinstance(path, bool):
                path = get_last_checkpoint(self.args.output_dir)
            if path:
                self.aimkp_callback.restore(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> Any:
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.aimkp_callback is not None:
            tokens = sum(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()) for batch in batch_samples)
            total = torch.tensor(float(tokens), dtype=torch.float64, device=self.args.device)
            if distributed():
                dist.all_reduce(total)
            self.aimkp_step_tokens = float(total)  # N: answer tokens of the whole optimizer step
        return batch_samples, num_items

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self.aimkp_callback is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if INDEX_COLUMN not in inputs:
            raise RuntimeError(
                "aimkp-plugin: a training batch arrived without sample indices; the data collator was replaced "
                "after the AimKP trainer was built. AimKP cannot run without them."
            )
        indices = inputs.pop(INDEX_COLUMN).tolist()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()  # schedule-free optimizers, as in Trainer.training_step
        inputs = self._prepare_inputs(inputs)
        core = self.accelerator.unwrap_model(model)
        parameters = [parameter for parameter in core.parameters() if parameter.requires_grad]
        with engine_gradients(self, model, parameters):
            outcomes = self._aimkp_step(core, parameters, self.aimkp_splitter.split(inputs, indices))
        self.aimkp_callback.record(outcomes)
        if self.accelerator.gradient_state.sync_gradients:
            self.aimkp_callback.synchronise()
        scale = self.accelerator.num_processes if distributed() else 1
        loss = sum(outcome.original_loss_sum for outcome in outcomes) / max(self.aimkp_step_tokens, 1.0) * scale
        return torch.tensor(loss, device=self.args.device)

    def _aimkp_step(
        self, core: Any, parameters: list[torch.Tensor], samples: list[SampleInputs]
    ) -> list[SampleOutcome]:
        """The AimKP step of one micro-batch (gradients into ``.grad``): the fast step where the model has one, the
        reference step for the rest (every sample without a fast layout, and those the fast step leaves to it)."""
        state, config = self.aimkp_callback.state, self.aimkp_config
        total = max(self.aimkp_step_tokens, 1.0)
        epoch = int(self.state.epoch or 0)
        outcomes: list[SampleOutcome] = []
        if self.aimkp_layout is not None:
            outcomes, left_to_reference = fast_batch_step(self.aimkp_layout, samples, state, config, total, epoch)
            samples = [samples[position] for position in left_to_reference]
        for sample in samples:
            outcomes.append(
                reference_sample_step(
                    core,
                    parameters,
                    sample,
                    state,
                    config,
                    total,
                    self.aimkp_mask_dtype,
                    epoch,
                    self.aimkp_reference_mask,
                    self.aimkp_removal,
                    self.aimkp_keys,
                )
            )
        return outcomes

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval", **gen_kwargs: Any
    ) -> dict[str, float]:
        """With keyphrase evaluation: the run's generation keys when none are passed (the trainer's in-training call
        passes none) and left padding while generating; otherwise LLaMA-Factory's ``evaluate``."""
        if self.aimkp_generation is None or not self.args.predict_with_generate:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
        tokenizer = self.processing_class
        padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        self.aimkp_eval_prefix = metric_key_prefix
        try:
            generation = gen_kwargs or self.aimkp_generation
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **generation)
        finally:
            tokenizer.padding_side = padding_side
            self.aimkp_eval_prefix = None

    def _aimkp_predictions_file(self) -> Path | None:
        """Where an evaluation writes its predictions (the main process only; not for ``predict``)."""
        if self.aimkp_eval_prefix is None or not self.is_world_process_zero():
            return None
        when = f"step{self.state.global_step}" if self.is_in_train else f"final_step{self.state.global_step}"
        name = f"{self.aimkp_eval_prefix}_{when}.jsonl"
        return Path(self.args.output_dir) / PREDICTIONS_FOLDER / name

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.aimkp_callback is not None and "loss" in logs:
            metrics = self.aimkp_callback.log_metrics()
            self.aimkp_callback.remember(self.state.global_step, metrics)
            logs.update(metrics)
        super().log(logs, *args, **kwargs)


def trainer_for_run(*args: Any, **kwargs: Any) -> AimkpSeq2SeqTrainer:
    """The trainer ``run_sft`` builds, given the AimKP options of the config this process read
    (:func:`~.args.active_arguments`)."""
    return AimkpSeq2SeqTrainer(*args, aimkp_arguments=active_arguments(), **kwargs)


def _patch_train_sft_workflow_trainer(module: ModuleType) -> None:
    """Replace ``llamafactory.train.sft.workflow.CustomSeq2SeqTrainer`` by :func:`trainer_for_run`, which builds
    the subclass that runs the AimKP step with the run's AimKP options.

    Why: ``run_sft`` builds its trainer from that name and the v0 trainer has no hook for a custom step. The subclass
    changes nothing unless the run's config has ``aimkp: true``. It subclasses ``llamafactory.train.sft.trainer.
    CustomSeq2SeqTrainer``, the class ``workflow`` imported by that name. Tested on llamafactory 0.9.5 and main
    (0.9.6.dev0).
    """
    patching.replace_attribute(module, "CustomSeq2SeqTrainer", "aimkp_trainer", lambda _: trainer_for_run)


patching.release_patches()  # the patches held while LLaMA-Factory's trainer was imported (the workflow's, above)
