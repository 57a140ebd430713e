/* File I/O shared by yolo_harness.c and net_harness.c: raw float32 arrays in and out, and one-line errors.
 * Define HARNESS_NAME (the program's name, for the error lines) before including it. */
#ifndef HARNESS_IO_H
#define HARNESS_IO_H

#include <stdio.h>
#include <stdlib.h>

/* Exit with one line naming the file and what is wrong. */
static void die(const char *path, const char *what)
{
    fprintf(stderr, HARNESS_NAME ": %s: %s\n", path, what);
    exit(2);
}

/* Read exactly count float32 values (a file of another length is an error). */
static void read_floats(const char *path, float *dst, size_t count)
{
    FILE *f = fopen(path, "rb");
    if (!f) die(path, "cannot open");
    size_t got = fread(dst, sizeof(float), count, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != count || extra) {
        char msg[128];
        snprintf(msg, sizeof msg, "expected exactly %zu float32 values, got %s%zu", count, extra ? "more than " : "",
                 got);
        die(path, msg);
    }
}

static void write_floats(const char *path, const float *src, size_t count)
{
    FILE *f = fopen(path, "wb");
    if (!f) die(path, "cannot create");
    if (fwrite(src, sizeof(float), count, f) != count) die(path, "short write");
    fclose(f);
}

#endif
