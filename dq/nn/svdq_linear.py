"""SVDQLinear: a QuantLinear with SVDQuant's smoothing vector and 16-bit low-rank branch.

    y = Q(x/s) Q(R)^T + ((x/s) L_down^T) L_up^T + b,      R = W diag(s) - L_up L_down

`smooth` (s, [in]), `lowrank_down` (L_down = V_r^T, [r, in]) and `lowrank_up` (L_up = U_r S_r, [out, r]) are
16-bit buffers in both modes (named lowrank_*, not lora_*: PEFT treats every state-dict key containing
"lora_" as adapter weights); in simulate mode the float Parameter `weight` holds the residual R (in the
smoothed space), in deploy mode R is packed like any QuantLinear weight. LoRA adapters (dq.pipelines.lora)
run through `forward_with_branch`, concatenated onto the branch at call time; they never touch these
buffers, so removing them restores the exact previous output.

With `act_shift` c > 0 (the post-GELU input of fc2) the quantized path sees x/s + c, which is non-negative
and quantized with an unsigned format; the shift's contribution c * rowsum(Q(R) + L_up L_down) is
subtracted from the bias, so the layer still computes x W^T + b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import DQError
from dq.nn.quant_linear import QuantLinear
from dq.nn.swap import QUANT_LAYER_TYPES
from dq.quant import QuantSpec
from dq.quant.lowrank import low_rank
from dq.sizes import tensors_bytes

BRANCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _check_options(name: str, rank: int, branch_dtype: str, act_shift: float) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise DQError(f"{name}: rank must be a non-negative integer, got {rank!r}.")
    if branch_dtype not in BRANCH_DTYPES:
        raise DQError(f"{name}: branch_dtype {branch_dtype!r} is not one of {sorted(BRANCH_DTYPES)}.")
    if not isinstance(act_shift, (int, float)) or act_shift < 0:
        raise DQError(f"{name}: act_shift must be a non-negative number, got {act_shift!r}.")


class SVDQLinear(QuantLinear):
    """nn.Linear computed as a quantized residual plus a 16-bit low-rank branch, on smoothed inputs.

    Example:
        >>> from dq.quant import QuantSpec, PerGroup, PerToken
        >>> w4, a4 = QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64))
        >>> layer = SVDQLinear.from_float(nn.Linear(256, 128), w4, a4, rank=32)   # data-free: SVD, no smoothing
        >>> layer.deploy()
        >>> y = layer(torch.randn(4, 256))
    """

    kind = "svdq_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        rank: int = 32,
        branch_dtype: str = "float16",
        act_shift: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_options(type(self).__name__, rank, branch_dtype, act_shift)
        super().__init__(in_features, out_features, bias, weight_spec, act_spec, device=device, dtype=dtype)
        self.rank = rank
        self.branch_dtype = branch_dtype
        self.act_shift = float(act_shift)
        bd = BRANCH_DTYPES[branch_dtype]
        self.register_buffer("smooth", torch.ones(in_features, dtype=bd, device=device))
        self.register_buffer("lowrank_down", torch.zeros(rank, in_features, dtype=bd, device=device))
        self.register_buffer("lowrank_up", torch.zeros(out_features, rank, dtype=bd, device=device))
        self._shift_cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def wrap(
        cls,
        linear: nn.Linear,
        weight_spec: QuantSpec,
        act_spec: QuantSpec | None,
        rank: int = 32,
        branch_dtype: str = "float16",
        act_shift: float = 0.0,
    ) -> "SVDQLinear":
        """An SVDQLinear sharing `linear`'s parameters, with s = 1 and an all-zero branch (no SVD yet)."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, weight_spec, act_spec,
            rank=rank, branch_dtype=branch_dtype, act_shift=act_shift, device="meta",
        )
        layer._adopt(linear)
        device = linear.weight.device
        for name in ("smooth", "lowrank_down", "lowrank_up"):
            buf = layer._buffers[name]
            layer._buffers[name] = (torch.ones if name == "smooth" else torch.zeros)(buf.shape, dtype=buf.dtype, device=device)
        return layer

    @classmethod
    def from_float(cls, module: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None, **options) -> "SVDQLinear":
        """Data-free SVDQ: rank-r randomized SVD of the weight (no smoothing), min-max residual scales.

        Calibration (dq.calib.svdquant) replaces this with the searched smoothing and its decomposition.
        """
        layer = cls.wrap(module, weight_spec, act_spec, **options)
        w = module.weight.detach().float()
        lr = low_rank(w, layer.rank)  # a fixed-seed sketch: the same layer always decomposes the same
        layer.set_decomposition(torch.ones(w.shape[1]), lr.up, lr.down, w)
        return layer

    def layer_options(self) -> dict:
        return {"rank": self.rank, "branch_dtype": self.branch_dtype, "act_shift": self.act_shift}

    # -- calibration -------------------------------------------------------------------------------
    @torch.no_grad()
    def set_decomposition(
        self, smooth: torch.Tensor, up: torch.Tensor, down: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None
    ) -> None:
        """Install s and the branch (rounded to 16 bits) and set the residual R = W diag(s) - L_up L_down.

        Args:
            smooth: [in] smoothing scale s.
            up, down: low-rank factors of W diag(s), [out, rank] and [rank, in].
            weight: the original float weight W [out, in].
            residual: a residual to install instead of the computed one (e.g. already GPTQ-rounded).
        Min-max weight scales are reset from the new residual.
        """
        if self.deployed:
            raise DQError("set_decomposition needs a simulate-mode SVDQLinear; it was already deployed.")
        if down.shape[0] != self.rank or up.shape[1] != self.rank:
            raise DQError(f"low-rank factors have rank {down.shape[0]}; this layer was planned with rank {self.rank}.")
        bd = BRANCH_DTYPES[self.branch_dtype]
        device = self._parameters["weight"].device
        self.smooth = smooth.to(device=device, dtype=bd)
        self.lowrank_down = down.to(device=device, dtype=bd).contiguous()
        self.lowrank_up = up.to(device=device, dtype=bd).contiguous()
        if residual is None:
            # Against the 16-bit values actually stored, so R + L_up L_down = W diag(s) up to float32 rounding.
            residual = weight.float().to(device) * self.smooth.float() - self.lowrank_up.float() @ self.lowrank_down.float()
        old = self._parameters["weight"]
        self._parameters["weight"] = nn.Parameter(residual.to(old.dtype), requires_grad=old.requires_grad)
        self.init_weight_scales()
        self._invalidate()

    @torch.no_grad()
    def extend_branch(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Append factors (down [r', in] on the smoothed input, up [out, r']) to the low-rank branch: the layer
        then computes its previous output plus ((x/s) down^T) up^T (how a LoRA is fused, dq.pipelines.lora)."""
        self._buffers["lowrank_down"] = torch.cat([self.lowrank_down, down.to(self.lowrank_down)], 0).contiguous()
        self._buffers["lowrank_up"] = torch.cat([self.lowrank_up, up.to(self.lowrank_up)], 1).contiguous()
        self.rank = self.lowrank_down.shape[0]
        self._invalidate()

    @torch.no_grad()
    def shrink_branch(self, rank: int) -> None:
        """Remove the last `rank` factors of the branch (undoes `extend_branch` exactly)."""
        if not 0 < rank <= self.rank:
            raise DQError(f"cannot remove {rank} factors from a low-rank branch of rank {self.rank}.")
        keep = self.rank - rank
        self._buffers["lowrank_down"] = self.lowrank_down[:keep].contiguous()
        self._buffers["lowrank_up"] = self.lowrank_up[:, :keep].contiguous()
        self.rank = keep
        self._invalidate()

    def float_weight(self) -> torch.Tensor:
        """The float weight this layer approximates, (R + L_up L_down) diag(1/s) (unquantized R in simulate mode)."""
        r = self._parameters["weight"].float() if not self.deployed else super().dequantized_weight().float()
        return (r + self.lowrank_up.float() @ self.lowrank_down.float()) / self.smooth.float()

    # -- forward ----------------------------------------------------------------------------------------
    def _invalidate(self) -> None:
        self._shift_cache = None

    def _shifted_bias(self, rq: torch.Tensor | None, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """b - c * rowsum(Q(R) + up @ down): cancels the shift seen by the quantized path and the branch.

        rq is the fake-quantized residual in simulate mode; in deploy mode (rq None) the result is cached
        per branch (a LoRA-extended branch gets its own).
        """
        c = self._shift_cache
        # The cache holds the branch tensors themselves, so identity cannot be confused by a reused id.
        if rq is None and c is not None and c[0] is down and c[1] is up:
            return c[2]
        rq = rq if rq is not None else super().dequantized_weight().float()
        out = -self.act_shift * (rq.sum(1) + up.float() @ down.float().sum(1))
        if self.bias is not None:
            out = out + self.bias.float()
        if not torch.is_grad_enabled() or not out.requires_grad:
            self._shift_cache = (down, up, out)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_branch(x, self.lowrank_down, self.lowrank_up)

    def forward_with_branch(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """The layer with its low-rank branch replaced by (down [r', in], up [out, r']): how LoRA adapters
        concatenated onto the SVD factors run in the same kernel call (dq.pipelines.lora)."""
        if not self.deployed:
            return self._simulate(x, down, up)
        bias = self.bias
        if self.act_shift:
            x = x + self.act_shift * self.smooth.to(x.dtype)
            bias = self._shifted_bias(None, down, up)
        return self.deployed_linear(x, bias, self.smooth, down, up)

    def _simulate(self, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Fake-quantized forward, the same math as the deployed kernel (fp32 accumulation)."""
        lead = x.shape[:-1]
        xs = (x.reshape(-1, self.in_features) / self.smooth.to(x.dtype)).float()
        wq = self.fake_quantized_weight().float()
        bias = self.bias
        if self.act_shift:
            xs = xs + self.act_shift
            bias = self._shifted_bias(wq, down, up)
        y = F.linear(self.act_quantizer(xs), wq, None if bias is None else bias.float())
        if down.shape[0] > 0:
            y = y + (xs @ down.float().t()) @ up.float().t()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    # -- deploy ---------------------------------------------------------------------------------------
    def kernel_act_spec(self) -> QuantSpec | None:
        return self.act_quantizer.spec  # the kernel quantizes the smoothed input itself

    def deploy(self) -> None:
        super().deploy()
        self._invalidate()

    def allocate_deployed(self, device: torch.device | str = "cpu") -> None:
        super().allocate_deployed(device)
        for name in ("smooth", "lowrank_down", "lowrank_up"):
            buf = self._buffers[name]
            self._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)
        self._invalidate()

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight the deployed layer approximates: (deq(R) + L_up L_down) diag(1/s)."""
        return self.float_weight().reshape(self.weight_shape).to(self.weight_dtype)

    def weight_nbytes(self) -> int:
        return super().weight_nbytes() + tensors_bytes([self.smooth, self.lowrank_down, self.lowrank_up])

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._invalidate()

    def extra_repr(self) -> str:
        shift = f", act_shift={self.act_shift}" if self.act_shift else ""
        return f"{super().extra_repr()}, rank={self.rank}{shift}"


QUANT_LAYER_TYPES[SVDQLinear.kind] = SVDQLinear
