"""Who runs where: the node of every rank, the nodes' names and the ranks each node holds.

The launcher says which node a process is on: torchrun (and accelerate, which runs torchrun's agent)
numbers its agents in GROUP_RANK, `srun` numbers the job's nodes in SLURM_NODEID, and plain python
is one node. Only when the launcher says nothing (RANK/WORLD_SIZE set by hand) does the host name
decide. One all_gather right after the process group starts tells every rank the whole picture.
The host name alone is not enough where the launcher knows better: two torchrun agents on one host
are two nodes, and "hosts" that are namespaces of one machine may share a name.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    local_rank: int  # the launcher's LOCAL_RANK / SLURM_LOCALID
    node: int  # index of this process's node; node 0 holds rank 0
    node_names: tuple[str, ...]  # per node
    node_ranks: tuple[tuple[int, ...], ...]  # per node, its global ranks in ascending order
    addresses: tuple[str, ...] = ()  # per rank, the address its peers reach it at (names a lost peer)

    @property
    def num_nodes(self) -> int:
        return len(self.node_ranks)

    def leader(self, node: int) -> int:
        """The rank that prepares for `node`: its lowest global rank (local rank 0 under every launcher)."""
        return self.node_ranks[node][0]

    @property
    def is_node_leader(self) -> bool:
        return self.rank == self.leader(self.node)

    def node_of(self, rank: int) -> int:
        return next(n for n, ranks in enumerate(self.node_ranks) if rank in ranks)

    def lost(self, error: str, silent: Optional[list[int]]) -> str | None:
        """Who a failed collective lost: the ranks that stopped beating (liveness.py; None there
        means the store is gone, and with it node 0), else the peer address gloo's error names."""
        if silent is None:
            return self._nodes_lost([0]) if self.node != 0 else None
        whole = [n for n, ranks in enumerate(self.node_ranks) if set(ranks) <= set(silent)]
        some = [r for r in silent if self.node_of(r) not in whole]
        named = [self._nodes_lost(whole)] if whole else []
        named += [f"rank {r} on node {self.node_names[self.node_of(r)]}" for r in some]
        return "; ".join(named) or self._peer_at(error)

    def _nodes_lost(self, nodes: list[int]) -> str:
        lost = [r for n in nodes for r in self.node_ranks[n]]
        return f"node {', '.join(self.node_names[n] for n in nodes)} (rank{'s' if len(lost) > 1 else ''} " \
               f"{', '.join(map(str, lost))})"

    def _peer_at(self, error: str) -> str | None:
        """gloo says `Read error [ADDRESS]:PORT ...` for the peer it lost. None when the address is
        not one of another node's (all namespaced nodes of one machine read 127.0.0.1)."""
        import re

        found = re.search(r"\[([0-9A-Fa-f:.]+)\]:\d+", error)
        if not found or not self.addresses or self.num_nodes == 1:  # one node: the address names no rank
            return None
        ranks = [r for r, a in enumerate(self.addresses) if a == found.group(1)]
        nodes = sorted({self.node_of(r) for r in ranks} - {self.node})
        return f"{self._nodes_lost(nodes)} at {found.group(1)}" if nodes else None

    def describe(self) -> str:
        """`2 nodes (n1, n2) x 2 processes`, `1 node (vm) x 1 process`; uneven nodes list their counts."""
        counts = {len(r) for r in self.node_ranks}
        nodes = f"{self.num_nodes} node{'s' if self.num_nodes > 1 else ''} ({', '.join(self.node_names)})"
        if len(counts) == 1:
            (n,) = counts
            return f"{nodes} x {n} process{'es' if n > 1 else ''}"
        return f"{nodes} with {' + '.join(str(len(r)) for r in self.node_ranks)} processes"


def host_name() -> str:
    return socket.gethostname().split(".")[0] or "localhost"


def node_identity(env: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """(key, name) of this process's node from the launch environment: processes with the same key
    are on the same node; the name is what the user calls the node."""
    env = os.environ if env is None else env
    name = env.get("SLURMD_NODENAME") or host_name()
    if "GROUP_RANK" in env:  # torchrun's agent number: one agent per node
        return f"agent:{env.get('TORCHELASTIC_RUN_ID', '')}:{env['GROUP_RANK']}", name
    if "SLURM_NODEID" in env and "SLURM_STEP_NUM_TASKS" in env:  # an srun task
        return f"slurm:{env.get('SLURM_JOB_ID', '')}:{env['SLURM_NODEID']}", name
    return f"host:{name}", name


def address() -> str:
    """This process's address as gloo picks it (the host name, resolved), the one peers name in errors."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""


def from_identities(rank: int, local_rank: int, identities: list[tuple], addresses: tuple[str, ...] = ()) -> Topology:
    """Group the ranks' (key, name) pairs into nodes, numbered by their lowest rank."""
    keys: dict[str, int] = {}
    names: list[str] = []
    ranks: list[list[int]] = []
    for r, (key, name) in enumerate(identities):
        if key not in keys:
            keys[key] = len(names)
            names.append(name)
            ranks.append([])
        ranks[keys[key]].append(r)
    if len(set(names)) < len(names):  # two agents on one host: tell them apart
        names = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    node = keys[identities[rank][0]]
    return Topology(rank, len(identities), local_rank, node, tuple(names), tuple(tuple(r) for r in ranks),
                    tuple(addresses))


def single(local_rank: int = 0) -> Topology:
    """One process on one node (plain python, or no process group)."""
    _, name = node_identity()
    return Topology(0, 1, local_rank, 0, (name,), ((0,),))


def detect(local_rank: int = 0) -> Topology:
    """Call on every rank after init_process_group (one all_gather of a short tuple, right after the
    group formed, so every rank is there); without a process group: one node, one process."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return single(local_rank)
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, (*node_identity(), address()))
    return from_identities(dist.get_rank(), local_rank, [tuple(x[:2]) for x in out], tuple(x[2] for x in out))
