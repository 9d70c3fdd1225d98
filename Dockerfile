# tf_medseg for GPU nodes (V100 / A100), paper profile: TensorFlow 2.15 from the official image,
# Horovod 0.28.1 built with NCCL for the GPU all-reduce and Gloo for the launcher (no MPI), and
# the package. Dockerfile.modern is the modern profile's image (TensorFlow 2.21, tf.distribute).
#
#   docker build -t tf-medseg .
#   docker run --gpus all -v /data:/data tf-medseg --preset=msd_spleen --data_dir=... --workdir=...
#
# The README's "Multi-GPU and multi-node training" section has the horovodrun commands.
FROM tensorflow/tensorflow:2.15.0-gpu

# Horovod's version is the Makefile's (tests/test_dockerfile.py checks that they agree).
ARG HOROVOD_VERSION=0.28.1
# The base image's CUDA is 12.2: the compiler, headers and NCCL must be built for the same.
ARG CUDA_APT=12-2
ARG NCCL_VERSION=2.18.3-1+cuda12.2

# Compilers and CUDA/NCCL headers to build Horovod; ssh for horovodrun across nodes.
RUN apt-get update && apt-get install -y --no-install-recommends \
        build-essential cmake python3-dev openssh-client openssh-server \
        cuda-nvcc-${CUDA_APT} cuda-cudart-dev-${CUDA_APT} \
        libnccl2=${NCCL_VERSION} libnccl-dev=${NCCL_VERSION} \
    && mkdir -p /run/sshd \
    && rm -rf /var/lib/apt/lists/*

# Horovod is compiled against the image's TensorFlow, so without build isolation. No driver
# runs during `docker build`: link against the CUDA stub library, then drop it again.
RUN python3 -m pip install --no-cache-dir "setuptools<70" wheel \
    && ldconfig /usr/local/cuda/targets/x86_64-linux/lib/stubs \
    && HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED HOROVOD_WITH_TENSORFLOW=1 \
       HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_WITHOUT_PYTORCH=1 \
       HOROVOD_WITHOUT_MXNET=1 \
       python3 -m pip install --no-cache-dir --no-build-isolation horovod==${HOROVOD_VERSION} \
    && ldconfig \
    && python3 -c "import horovod.tensorflow as hvd; assert hvd.nccl_built() and hvd.gloo_built()"

# The package on the image's TensorFlow (no profile extra: setup.py) and NumPy 1 (TF 2.15's).
COPY setup.py README.md /opt/tf_medseg/
COPY tf_medseg /opt/tf_medseg/tf_medseg
RUN python3 -m pip install --no-cache-dir /opt/tf_medseg "numpy<2" \
    && python3 -m tf_medseg.stack \
    && python3 -c "import tensorflow as tf, tf_medseg; assert tf.__version__.startswith('2.15')" \
    && python3 -c "from tf_medseg import presets; print('presets:', presets.path('msd_spleen'))"

WORKDIR /workspace
ENTRYPOINT ["tf-medseg-train"]
