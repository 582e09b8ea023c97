# GPAW build settings for almd (read by GPAW's setup.py through GPAW_CONFIG).
# Serial GPAW built with gcc: almd runs it in its own worker processes, never inside
# almd's MPI communicator, and a system mpicc (Quantum ESPRESSO brings Open MPI's)
# would otherwise be picked up and fail to link. libxc and BLAS are used when their
# Debian -dev packages are installed (the README's note on GPAW says what they buy).
mpi = False
compiler = "gcc"
