"""
Optimisation: the learning-rate schedule, the optimizers (AdamW; Muon for hidden matrices; bitsandbytes' 8-bit and
paged AdamW on CUDA) and the step that unscales, clips and applies the gradients.
"""
import math

import torch

from errors import GlimpseError


def lr_at(it, learning_rate, min_lr, warmup_iters, max_iters):
    """Linear warmup, then cosine decay to min_lr at max_iters."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (learning_rate - min_lr)


def set_lr(optimizer, lr):
    """The schedule's rate for every parameter group, scaled by the group's lr_scale (see make_optimizer)."""
    for group in optimizer.param_groups:
        group['lr'] = lr * group.get('lr_scale', 1.0)


OPTIMIZERS = ('adamw', 'muon', 'adamw8bit', 'paged_adamw')  # make_optimizer's choices


def check_optimizer(optimizer, device_type):
    """A one-line config error for an optimizer this device cannot run (train_vlm.py asks before weights load)."""
    if optimizer not in OPTIMIZERS:
        raise GlimpseError(f"config error: --optimizer={optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if optimizer in ('adamw8bit', 'paged_adamw') and device_type != 'cuda':
        raise GlimpseError(f"config error: --optimizer={optimizer} needs CUDA (bitsandbytes 8-bit and paged "
                           f"optimizer states); on {device_type} use --optimizer=adamw")

# learned positions, class and register tokens: glimpse's ViT's names, and those of SigLIP, CLIP and DINOv2 in transformers
NO_DECAY = ('pos_embed', 'position_embedding', 'cls_token', 'class_embedding', 'registers', 'register_tokens')


def make_optimizer(model, learning_rate, weight_decay, betas, device_type, optimizer='adamw', lr_scales=None,
                   dtype='float32'):
    """AdamW over the trainable parameters; weight decay on weight matrices only: not on norms and biases, nor on
    the learned tokens and positions of a tower (NO_DECAY: as timm and DINOv2 train them). lr_scales
    {'llm': 0.1, ...}: a component's learning rate relative to the schedule's (each group keeps its 'lr_scale').
    optimizer 'muon': Muon for the hidden weight matrices (MuonAdamW; its Newton-Schulz in bf16 on CUDA and
    in bf16 runs (dtype), else fp32);
    'adamw8bit' / 'paged_adamw': bitsandbytes, CUDA only."""
    check_optimizer(optimizer, device_type)
    groups = {}
    looked_up = {id(p) for mod in model.modules() if isinstance(mod, torch.nn.Embedding) for p in mod.parameters()}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = (lr_scales or {}).get(n.split('.')[0], 1.0)
        decay = p.dim() >= 2 and not any(k in n for k in NO_DECAY)
        muon = optimizer == 'muon' and id(p) not in looked_up and is_hidden_matrix(n, p)
        g = groups.setdefault((scale, decay, muon), {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                                                     'lr_scale': scale, 'lr': learning_rate * scale})
        g['params'].append(p)
    if optimizer == 'muon':
        hidden = [g for (_, _, muon), g in groups.items() if muon]
        rest = [g for (_, _, muon), g in groups.items() if not muon]
        ns_dtype = torch.bfloat16 if device_type == 'cuda' or dtype == 'bfloat16' else torch.float32
        return MuonAdamW(hidden, rest, learning_rate, betas, device_type, ns_dtype)
    groups = list(groups.values())
    if optimizer == 'adamw':
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == 'cuda')
    import bitsandbytes as bnb
    opt = bnb.optim.AdamW8bit if optimizer == 'adamw8bit' else bnb.optim.PagedAdamW
    return opt(groups, lr=learning_rate, betas=betas)


def is_hidden_matrix(name, p):
    """A weight matrix inside the network, which Muon trains: 2-D, not an output head (make_optimizer also
    leaves out embedding tables: their rows are looked up one token at a time), not a LoRA adapter, not a
    learned position or token."""
    return p.dim() == 2 and not any(k in name for k in NO_DECAY + ('lm_head', 'lora_'))


def orthogonalize(g, steps=5, dtype=torch.bfloat16):
    """The nearest semi-orthogonal matrix to g, roughly (U S' V^T with S' in about [0.7, 1.2] for g = U S V^T):
    Newton-Schulz iterations of the quintic 3.4445 x - 4.7750 x^3 + 2.0315 x^5 (Keller Jordan's coefficients,
    tuned for speed at small singular values, not for exact convergence). dtype: bf16 where bf16 matmuls are
    native (CUDA, AVX512-BF16 CPUs); fp32 elsewhere, where bf16 is emulated and several times slower."""
    x = g.to(dtype)
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the smaller Gram matrix
    x = x / (x.norm() + 1e-7)  # spectral norm <= Frobenius norm = 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = 3.4445 * x + (-4.7750 * gram + 2.0315 * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised (Muon: Keller Jordan 2024; modded-nanogpt and nanochat train their transformers'
    matrices with it): each step is the Nesterov momentum of the gradient made near-orthogonal, so every
    direction of a weight matrix moves at a similar rate, not only the gradient's few dominant ones. For 2-D
    parameters only. The step is scaled by 0.2 sqrt(max(rows, cols)), the root-mean-square of an AdamW update
    (Moonshot's Muon scaling), so AdamW's learning rate and schedule carry over. Decoupled weight decay."""

    def __init__(self, params, lr=1e-3, momentum=0.95, weight_decay=0.0, ns_steps=5, ns_dtype=torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group['params']:
                if p.dim() != 2:
                    raise ValueError(f'Muon trains 2-D weight matrices; got a parameter of shape {tuple(p.shape)}')

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group['lr'], group['momentum']
            for p in group['params']:
                if p.grad is None:
                    continue
                state = self.state[p]
                if 'momentum' not in state:
                    state['momentum'] = torch.zeros_like(p)
                buf = state['momentum']
                buf.lerp_(p.grad, 1 - mu)  # EMA of the gradient
                direction = orthogonalize(p.grad.lerp(buf, mu), group['ns_steps'], self.ns_dtype)  # Nesterov
                p.mul_(1 - lr * group['weight_decay'])
                p.add_(direction.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


class MuonAdamW:
    """Muon for the hidden weight matrices, AdamW for the rest: one optimizer to the training loop.
    param_groups lists both optimizers' groups, so set_lr reaches every one."""

    def __init__(self, hidden_groups, other_groups, lr, betas, device_type, ns_dtype=torch.float32):
        self.optimizers = [Muon(hidden_groups, lr=lr, ns_dtype=ns_dtype)]
        if other_groups:
            self.optimizers.append(torch.optim.AdamW(other_groups, lr=lr, betas=betas, fused=device_type == 'cuda'))

    @property
    def param_groups(self):  # read anew each time: load_state_dict gives each optimizer new group dicts
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {'muon_adamw': [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        if 'muon_adamw' not in state or len(state['muon_adamw']) != len(self.optimizers):
            raise GlimpseError('resume error: the checkpoint\'s optimizer state is not optimizer=\'muon\'\'s; '
                               'resume with the optimizer the run was started with')
        for o, s in zip(self.optimizers, state['muon_adamw']):
            o.load_state_dict(s)


def optimizer_step(model, optimizer, scaler, grad_clip):
    """After the step's backward passes: unscale (fp16), clip the gradient norm (grad_clip > 0), step, clear."""
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
