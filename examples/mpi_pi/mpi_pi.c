/* mpi_pi: pi by the midpoint rule, split across MPI ranks; a distributed benchmark for cloister.
 *
 *   mpirun --hostfile HOSTFILE -np RANKS ./mpi_pi [-n INTERVALS] [-r ROUNDS]
 *
 * Every round each rank integrates 4/(1+x^2) over its share of INTERVALS and the shares are
 * summed with MPI_Allreduce. Rank 0 prints where each rank ran, the result and the time:
 *
 *   mpi_pi: rank 3 of 4 on HOST
 *   mpi_pi: ranks=4 intervals=20000000 rounds=5 pi=3.141592653589793 error=1.2e-15
 *   mpi_pi: time_s=0.183
 *
 * Exit codes: 0 ok, 1 bad usage, 2 a result off by more than the rule's error bound (h^2/3).
 */
#include <math.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static long parse(const char *text, const char *flag) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*text == '\0' || *end != '\0' || value < 1) {
        fprintf(stderr, "mpi_pi: error: %s expects a positive integer, got '%s'\n", flag, text);
        exit(1);
    }
    return value;
}

int main(int argc, char **argv) {
    long intervals = 20000000, rounds = 5;
    int rank, size, len;
    char host[MPI_MAX_PROCESSOR_NAME];

    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && strcmp(argv[i], "-n") == 0) intervals = parse(argv[++i], "-n");
        else if (i + 1 < argc && strcmp(argv[i], "-r") == 0) rounds = parse(argv[++i], "-r");
        else {
            if (rank == 0) fprintf(stderr, "mpi_pi: error: unknown argument '%s' (usage: mpi_pi [-n N] [-r R])\n", argv[i]);
            MPI_Finalize();
            return 1;
        }
    }

    /* Where every rank runs: rank 0 gathers the host names. */
    memset(host, 0, sizeof host);
    MPI_Get_processor_name(host, &len);
    char *hosts = rank == 0 ? malloc((size_t)size * MPI_MAX_PROCESSOR_NAME) : NULL;
    MPI_Gather(host, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, hosts, MPI_MAX_PROCESSOR_NAME, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (rank == 0) {
        for (int r = 0; r < size; r++) printf("mpi_pi: rank %d of %d on %s\n", r, size, hosts + (size_t)r * MPI_MAX_PROCESSOR_NAME);
        free(hosts);
    }

    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime(), pi = 0.0, h = 1.0 / (double)intervals;
    for (long round = 0; round < rounds; round++) {
        double part = 0.0;
        for (long i = rank; i < intervals; i += size) {
            double x = h * ((double)i + 0.5);
            part += 4.0 / (1.0 + x * x);
        }
        part *= h;
        MPI_Allreduce(&part, &pi, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
    }
    double elapsed = MPI_Wtime() - start;
    int status = 0;
    if (rank == 0) {
        double error = fabs(pi - M_PI);
        printf("mpi_pi: ranks=%d intervals=%ld rounds=%ld pi=%.15f error=%.2g\n", size, intervals, rounds, pi, error);
        printf("mpi_pi: time_s=%.6f\n", elapsed);
        if (error > h * h / 3.0 + 1e-12) {
            fprintf(stderr, "mpi_pi: error: pi=%.15f is off by %.2g\n", pi, error);
            status = 2;
        }
    }
    MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD);
    MPI_Finalize();
    return status;
}
