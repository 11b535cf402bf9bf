# fasweep image: the Ray head/workers of a KubeRay cluster, the RayJob driver, and the MLflow tracking server.
#
# Base: rayproject/ray:<ray>-py311-gpu. It ships CUDA runtime libraries, Python 3.11 and the exact Ray
# that KubeRay and the `fasweep launch` driver must share (Ray refuses mismatched versions), and it
# already runs as the non-root user `ray` (uid 1000) with `ray`, bash and wget on PATH, which KubeRay's
# generated `ray start` command and probes rely on. An nvidia/cuda base would need all of that by hand.
#
# Entrypoint: `fasweep`, so `docker run IMAGE launch sweeps/x.yaml` works. KubeRay still runs `ray start`
# in it because it sets each Ray container's `command` (`/bin/bash -lc -- "ulimit ...; ray start ..."`),
# and a Kubernetes `command` replaces the image ENTRYPOINT; the RayJob submitter pod does the same.
#
# Build (from the repository root):  docker build -t fasweep:0.1.0 .
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg

# Everything below runs as the image's non-root user; numeric so Kubernetes' runAsNonRoot can verify it.
USER 1000:100

# Layer 1, dependencies only (rebuilt when pyproject.toml or the pins change, not on a source edit).
# The list comes from pyproject.toml; the server extras serve MLflow on PostgreSQL with S3 artifacts and basic auth.
# (COPY --chown creates /home/ray/fasweep owned by ray, so the in-tree build below may write there.)
COPY --chown=1000:100 pyproject.toml deploy/docker/constraints.txt /home/ray/fasweep/
WORKDIR /home/ray/fasweep
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt -c constraints.txt "mlflow[auth]" psycopg2-binary boto3

# Layer 2, the package and the sweep specs (small; changes often).
COPY --chown=1000:100 README.md ./
COPY --chown=1000:100 fasweep ./fasweep
COPY --chown=1000:100 sweeps ./sweeps
RUN pip install --no-deps . && fasweep --help > /dev/null

ENTRYPOINT ["fasweep"]
CMD ["--help"]
