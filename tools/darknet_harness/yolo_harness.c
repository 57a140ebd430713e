/*
 * Oracle for the detection heads' training pass: runs AlexeyAB/darknet's own forward_yolo_layer,
 * forward_region_layer or forward_gaussian_yolo_layer (CPU build) on fixed raw inputs and truths and dumps what
 * they compute.
 *
 *   yolo_harness info CFG           one line per head: kind (yolo, region, gaussian), geometry, mask and anchors
 *   yolo_harness run CFG DIR [IT]   reads DIR/truth.bin and DIR/input_K.bin, writes DIR/output_K.bin,
 *                                   DIR/delta_K.bin and DIR/result.txt (costs, the printed loss, counters)
 *
 * Each head gets its own input straight from DIR (not the previous layer's output), so the network's
 * convolutions play no part. The network_state is the one train_network_datum() builds for one batch.
 * output_K.bin is l.output as the layer leaves it: for [region] that is Darknet's flattened layout (per image
 * h*w rows of n*(5+classes) values); delta_K.bin is always in the input's layout (what backward hands down).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "darknet.h"
#include "network.h"
#include "parser.h"
#include "yolo_layer.h"
#include "region_layer.h"
#include "gaussian_yolo_layer.h"

#define HARNESS_NAME "yolo_harness"
#include "harness_io.h"

static int is_head(layer l)
{
    return l.type == YOLO || l.type == REGION || l.type == GAUSSIAN_YOLO;
}

/* The truths of one batch as the detection loader lays them out: per image max_boxes rows of truth_size floats. */
static int truth_row(network net, const char *cfg, int *truth_size)
{
    int max_boxes = -1;
    for (int i = 0; i < net.n; ++i) {
        layer l = net.layers[i];
        if (!is_head(l)) continue;
        /* train_detector sizes the truth buffer from the last layer; a different size elsewhere would misread it */
        if (max_boxes >= 0 && (l.max_boxes != max_boxes || l.truth_size != *truth_size))
            die(cfg, "detection layers disagree on max= (or the truth row size)");
        max_boxes = l.max_boxes;
        *truth_size = l.truth_size;
    }
    if (max_boxes < 0) die(cfg, "no [yolo], [region] or [Gaussian_yolo] layer");
    return max_boxes;
}

static void print_info(network net, const char *cfg)
{
    int truth_size = 0;
    int max_boxes = truth_row(net, cfg, &truth_size);
    printf("net %d %d %d %d %d\n", net.w, net.h, net.batch, max_boxes, truth_size);
    for (int i = 0; i < net.n; ++i) {
        layer l = net.layers[i];
        if (!is_head(l)) continue;
        /* [region] has no mask: every anchor of its list (l.n of them), in grid cells */
        int total = l.type == REGION ? l.n : l.total;
        printf("%s %d %d %d %d %d %d mask", l.type == YOLO ? "yolo" : l.type == REGION ? "region" : "gaussian", i,
               l.w, l.h, l.n, total, l.classes);
        for (int k = 0; k < l.n; ++k) printf(" %d", l.type == REGION ? k : l.mask[k]);
        printf(" anchors");
        for (int k = 0; k < 2 * total; ++k) printf(" %.9g", l.biases[k]);
        printf("\n");
    }
}

/* One training batch through every [yolo] layer, each fed from DIR/input_K.bin. */
static void run_batch(network net, const char *cfg, const char *dir, int iteration)
{
    int truth_size = 0;
    int max_boxes = truth_row(net, cfg, &truth_size);
    char path[4096];
    size_t ntruth = (size_t)net.batch * max_boxes * truth_size;
    float *truth = (float *)calloc(ntruth, sizeof(float));
    snprintf(path, sizeof path, "%s/truth.bin", dir);
    read_floats(path, truth, ntruth);

    /* as train_network_datum: seen counts this batch, cur_iteration is the number of updates done so far */
    *net.seen = (uint64_t)(iteration + 1) * net.batch;
    *net.cur_iteration = iteration;
    network_state state = {0};
    state.net = net;
    state.truth = truth;
    state.train = 1;
    state.workspace = net.workspace;

    for (int i = 0; i < net.n; ++i) {
        layer l = net.layers[i];
        if (!is_head(l)) continue;
        size_t count = (size_t)l.outputs * l.batch;
        float *input = (float *)calloc(count, sizeof(float));
        snprintf(path, sizeof path, "%s/input_%d.bin", dir, i);
        read_floats(path, input, count);
        state.index = i;
        state.input = input;
        if (l.type == YOLO) forward_yolo_layer(l, state);
        else if (l.type == REGION) forward_region_layer(l, state);
        else forward_gaussian_yolo_layer(l, state);
        snprintf(path, sizeof path, "%s/output_%d.bin", dir, i);
        write_floats(path, l.output, count);
        snprintf(path, sizeof path, "%s/delta_%d.bin", dir, i);
        write_floats(path, l.delta, count);
        free(input);
    }
    free(truth);
}

static void write_result(network net, const char *dir, int iteration)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/result.txt", dir);
    FILE *f = fopen(path, "w");
    if (!f) die(path, "cannot create");
    for (int i = 0; i < net.n; ++i)
        if (is_head(net.layers[i])) fprintf(f, "cost %d %.9g\n", i, net.layers[i].cost[0]);
    /* what train_detector prints as "N: loss, avg loss": train_network() returns
       sum over subdivisions of get_network_cost() / (subdivisions * batch); one subdivision here */
    fprintf(f, "network_cost %.9g\n", get_network_cost(net));
    fprintf(f, "loss %.9g\n", get_network_cost(net) / net.batch);
    fprintf(f, "seen %llu\n", (unsigned long long)*net.seen);
    fprintf(f, "iteration %d\n", iteration);
    fprintf(f, "total_bbox %d\n", *net.total_bbox);
    fprintf(f, "rewritten_bbox %d\n", *net.rewritten_bbox);
    fclose(f);
}

int main(int argc, char **argv)
{
    if (argc < 3 || (strcmp(argv[1], "info") && strcmp(argv[1], "run")) || (!strcmp(argv[1], "run") && argc < 4)) {
        fprintf(stderr, "usage: %s info CFG | %s run CFG DIR [ITERATION]\n", argv[0], argv[0]);
        return 2;
    }
    /* batch and subdivisions come from the cfg, as train_detector's parse_network_cfg() */
    network net = parse_network_cfg_custom(argv[2], 0, 0);
    if (!strcmp(argv[1], "info")) {
        print_info(net, argv[2]);
    } else {
        int iteration = argc > 4 ? atoi(argv[4]) : 0;
        run_batch(net, argv[2], argv[3], iteration);
        write_result(net, argv[3], iteration);
    }
    free_network(net);
    return 0;
}
