"""The Slurm cluster fixture: started once per session, skipped (with the reason) only where
Debian's slurm packages are absent; CI sets ZEROFORGE_REQUIRE_SLURM=1 so that a skip fails."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.slurm.cluster import SlurmCluster, missing_binaries


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    missing = missing_binaries()
    if missing:
        reason = f"Slurm is not installed (missing {', '.join(missing)}): apt-get install slurmctld slurmd slurm-client munge"
        if os.environ.get("ZEROFORGE_REQUIRE_SLURM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
