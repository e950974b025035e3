"""How the inference service batches and places a version: `ServingConfig`, its rules and its proto form.

One definition with one set of defaults for the registry, the inference service, the pipeline and
the SDK. An unset field means its default: no batching, one instance, device "cpu". Adding a
setting is a field here (with its rule in `normalized` and its line in `to_pb`/`from_pb`), the
proto field in protos/aiaas/registry/v1/registry.proto, and its use in the inference service.
"""

from __future__ import annotations

import dataclasses
import re

from aiaas.errors import InvalidArgument
from aiaas.registry.v1 import registry_pb2 as pb

DEFAULT_DEVICE = "cpu"
DEVICE_RE = re.compile(r"cpu|cuda(:[0-9]{1,3})?")
MAX_BATCH_SIZE = 65536
MAX_QUEUE_DELAY_US = 60_000_000
MAX_INSTANCES = 64
# Generative engine sizing (format hf_causal_lm): bounds on what one version may ask of a worker.
MAX_KV_CACHE_TOKENS = 1 << 24
MAX_NUM_SEQS = 4096
MAX_NUM_BATCHED_TOKENS = 1 << 20
# Engines a generative version may choose ("" is the builtin one).
GENERATIVE_ENGINES = ("", "builtin", "vllm")


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    # 0 turns batching off; with batching the first dimension of every tensor is the batch.
    max_batch_size: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    instance_count: int = 1
    device: str = DEFAULT_DEVICE
    # 0: the inference service's own max_queue_size setting.
    max_queue_size: int = 0
    # 0: no timeout unless the request names one.
    default_timeout_us: int = 0
    # Wait up to max_queue_delay_us for more requests even when an instance is idle and nothing
    # else is queued (Triton's behaviour). Off: such a batch goes at once ("idle dispatch").
    strict_queue_delay: bool = False
    # Generative models only (0: the engine's default): each instance's KV-cache budget in token
    # slots, the sequences of its running batch, and the tokens of one forward pass.
    kv_cache_tokens: int = 0
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    # Generative models only: "" / "builtin" (aiaas's engine) or "vllm" (vLLM's, where installed).
    engine: str = ""

    def normalized(self) -> ServingConfig:
        """This config checked against the registry's rules (InvalidArgument naming the field),
        with preferred sizes sorted and deduplicated and unset fields at their defaults."""
        if not 0 <= self.max_batch_size <= MAX_BATCH_SIZE:
            raise InvalidArgument(
                f"serving_config.max_batch_size must be 0..{MAX_BATCH_SIZE}, got {self.max_batch_size}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise InvalidArgument(f"serving_config.preferred_batch_sizes: {size} is not between 1 and "
                                      f"max_batch_size ({self.max_batch_size})")
        if not 0 <= self.max_queue_delay_us <= MAX_QUEUE_DELAY_US:
            raise InvalidArgument(f"serving_config.max_queue_delay_us must be 0..{MAX_QUEUE_DELAY_US}")
        if not 0 <= self.instance_count <= MAX_INSTANCES:
            raise InvalidArgument(f"serving_config.instance_count must be 0..{MAX_INSTANCES} (0 means 1)")
        device = self.device or DEFAULT_DEVICE
        if not DEVICE_RE.fullmatch(device):
            raise InvalidArgument(f"serving_config.device {self.device!r} is invalid: use 'cpu', 'cuda' or 'cuda:N'")
        if self.max_queue_size < 0 or self.default_timeout_us < 0:
            raise InvalidArgument("serving_config.max_queue_size and default_timeout_us must be >= 0")
        for name, bound in (("kv_cache_tokens", MAX_KV_CACHE_TOKENS), ("max_num_seqs", MAX_NUM_SEQS),
                            ("max_num_batched_tokens", MAX_NUM_BATCHED_TOKENS)):
            if not 0 <= getattr(self, name) <= bound:
                raise InvalidArgument(f"serving_config.{name} must be 0..{bound} (0: the engine's default), "
                                      f"got {getattr(self, name)}")
        if self.engine not in GENERATIVE_ENGINES:
            raise InvalidArgument(f"serving_config.engine must be one of {', '.join(repr(e) for e in GENERATIVE_ENGINES)}"
                                  f", got {self.engine[:40]!r}")
        return dataclasses.replace(self, preferred_batch_sizes=tuple(sorted(set(self.preferred_batch_sizes))),
                                   instance_count=self.instance_count or 1, device=device)

    def validate(self) -> None:
        """Raise InvalidArgument when the registry would refuse this config."""
        self.normalized()


def to_pb(config: ServingConfig) -> pb.ServingConfig:
    return pb.ServingConfig(
        max_batch_size=config.max_batch_size, preferred_batch_sizes=list(config.preferred_batch_sizes),
        max_queue_delay_us=config.max_queue_delay_us, instance_count=config.instance_count, device=config.device,
        max_queue_size=config.max_queue_size, default_timeout_us=config.default_timeout_us,
        strict_queue_delay=config.strict_queue_delay, kv_cache_tokens=config.kv_cache_tokens,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
        engine=config.engine,
    )


def from_pb(message: pb.ServingConfig) -> ServingConfig:
    """The config a message describes; a field it leaves unset (0, "") takes its default."""
    return ServingConfig(
        max_batch_size=message.max_batch_size, preferred_batch_sizes=tuple(message.preferred_batch_sizes),
        max_queue_delay_us=message.max_queue_delay_us, instance_count=message.instance_count or 1,
        device=message.device or DEFAULT_DEVICE, max_queue_size=message.max_queue_size,
        default_timeout_us=message.default_timeout_us, strict_queue_delay=message.strict_queue_delay,
        kv_cache_tokens=message.kv_cache_tokens, max_num_seqs=message.max_num_seqs,
        max_num_batched_tokens=message.max_num_batched_tokens, engine=message.engine,
    )
