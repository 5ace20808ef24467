"""Pointed-DAG environments, exact soft-Bellman solvers and tabular/MLP policies (§4).

Every state of these DAGs may terminate. Everything is enumerated exactly: states, parents,
children, path counts ``n(x)``, terminating distributions; ``steer exact`` prints the checks.
"""

from steer.discrete.bayesnet import BayesNetStructure, bic_local_score, count_dags
from steer.discrete.env import BACKWARD_KINDS, DAGEnvironment, check_enumerable
from steer.discrete.exact import (
    SoftBellmanSolution,
    corrected_reward,
    energy_difference_reward,
    forward_log_flow,
    kl_regularised_reward,
    path_consistency_residual,
    scatter_logsumexp,
    soft_bellman,
    terminating_distribution,
    terminating_log_distribution,
    total_variation,
    uncorrected_reward,
)
from steer.discrete.hypergrid import HyperGrid, hypergrid_reward
from steer.discrete.policies import (
    MLPPolicy,
    PolicyTable,
    TabularPolicy,
    rollout,
    sample_trajectories,
    trajectories_from_states,
)
from steer.discrete.training import (
    DAG_OBJECTIVES,
    DAGTrainConfig,
    TrainResult,
    discrete_loss,
    policy_tv,
    train,
    transition_loss,
)

__all__ = [
    "BACKWARD_KINDS",
    "DAG_OBJECTIVES",
    "BayesNetStructure",
    "DAGEnvironment",
    "DAGTrainConfig",
    "HyperGrid",
    "MLPPolicy",
    "PolicyTable",
    "SoftBellmanSolution",
    "TabularPolicy",
    "TrainResult",
    "bic_local_score",
    "check_enumerable",
    "corrected_reward",
    "count_dags",
    "discrete_loss",
    "energy_difference_reward",
    "forward_log_flow",
    "hypergrid_reward",
    "kl_regularised_reward",
    "path_consistency_residual",
    "policy_tv",
    "rollout",
    "sample_trajectories",
    "scatter_logsumexp",
    "soft_bellman",
    "terminating_distribution",
    "terminating_log_distribution",
    "total_variation",
    "train",
    "trajectories_from_states",
    "transition_loss",
    "uncorrected_reward",
]
