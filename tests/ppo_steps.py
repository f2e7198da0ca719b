"""Steps of one PPO-Lag iteration called one by one, as train_ppo_lag.ppo_iteration calls them, for tests that
look at what each step produces. The keyword values come from train_ppo_lag's own *_settings(args), the mapping
main uses, so a test and a run agree on them."""

import torch

import train_ppo_lag


def rollout(roles, processor, family, prompt_batch, args):
    """Steps 1-3."""
    device = prompt_batch["input_ids"].device
    return train_ppo_lag.rollout(roles, processor, family, prompt_batch,
                                 **train_ppo_lag.rollout_settings(args, device))


def values(r, roles, args, trained=None):
    """Step 4 after `rollout`: draws the update's first minibatch order (as ppo_iteration does) and returns
    (order, the critic losses step 4 already backpropagated: only with --reuse_critic_forward)."""
    order = torch.randperm(r.mask.shape[0])
    reuse = train_ppo_lag.reuses_critic_forward(args.reuse_critic_forward, args.update_iters, r.mask.shape[0],
                                                args.per_device_train_batch_size)
    critics = {k: m for k, m in ((trained or roles.trained()) if reuse else roles.trained()).items() if k != "actor"}
    done = train_ppo_lag.value_step(r, critics, order, reuse,
                                    **train_ppo_lag.value_settings(args, r.mask.device))
    return order, done


def rollout_and_values(roles, processor, family, prompt_batch, args, trained=None):
    """Steps 1-4: (the rollout, the first minibatch order, the critic losses done in step 4)."""
    r = rollout(roles, processor, family, prompt_batch, args)
    return (r, *values(r, roles, args, trained))


def update(trained, optimizers, r, family, args, order=None, done=None, **kwargs):
    """Steps 6-8 (order None: ppo_update draws the first minibatch order itself)."""
    return train_ppo_lag.ppo_update(trained, optimizers, r, family, order, done,
                                    **train_ppo_lag.update_settings(args, r.mask.device), **kwargs)


def lambda_step(lam, window, episode_costs, step, args, pid_state=None):
    """Step 9 at PPO step `step` (1-based)."""
    update = args.algo == "ppo_lag" and step >= args.lambda_update_delay_steps
    return train_ppo_lag.lambda_step(lam, window, episode_costs, update, **train_ppo_lag.lambda_settings(args),
                                     pid_state=pid_state)
