/*
 * Whole-network oracle: AlexeyAB/darknet builds a cfg, fills it with seeded random weights that keep activations
 * in range, writes them with its own save_weights, runs network_predict on a given input and dumps what it computes.
 *
 *   net_harness CFG DIR SEED [all]
 *
 * Reads  DIR/input.bin          net.c * net.h * net.w float32 (CHW, RGB, 0..1), the network's input
 * Writes DIR/darknet.weights    the weights, by Darknet's save_weights
 *        DIR/layers.tsv         one line per layer: index, type, out c h w, outputs; heads add n classes coords
 *        DIR/out_<i>.bin        layer i's output (l.output, batch 1) for every head and the layer before each head
 *                               (the head's input); with `all`, for every layer
 *        DIR/boxes.bin          get_network_boxes(net, net.w, net.h, thresh 0, hier 0.5, relative 1, letter
 *                               net.letter_box): per detection x y w h objectness prob[classes] (uc[4] for
 *                               [Gaussian_yolo]), float32
 *        DIR/boxes.txt          count, classes, floats per row
 *
 * The weights: every convolution gets uniform weights of variance 1/fan_in; a batch-normalised convolution's
 * rolling variance is the per-channel mean square of its own output on DIR/input.bin (at least half the layer's
 * or its input's mean square, times a random factor in [0.8, 1.25]), its rolling mean a random fraction (-0.5 to
 * 0.5) of the root mean square, its scale and bias random (so every layer's output stays in a useful range
 * however deep the network); a convolution without batch norm is rescaled to an output spread of 1.5 and gets a
 * random bias. Shortcut, implicit and batchnorm-layer weights are random near their neutral values. The
 * statistics come from Darknet's own layer forward functions; the dumped outputs come from network_predict.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "darknet.h"
#include "network.h"
#include "parser.h"

#define HARNESS_NAME "net_harness"
#include "harness_io.h"

static const char *g_cfg;

static uint64_t g_state;

/* splitmix64: the same stream on every platform and libc (rand() is not). */
static uint64_t next_u64(void)
{
    uint64_t z = (g_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static float uniform(float lo, float hi)
{
    return lo + (hi - lo) * (float)((next_u64() >> 40) * (1.0 / 16777216.0));
}

static void fill(float *p, int n, float lo, float hi)
{
    for (int i = 0; i < n; ++i) p[i] = uniform(lo, hi);
}

static int is_head(LAYER_TYPE t)
{
    return t == YOLO || t == GAUSSIAN_YOLO || t == REGION || t == DETECTION;
}

/* Per-channel mean square of a (c, h*w) output. */
static void channel_mean_square(const float *x, int c, int hw, float *ms)
{
    for (int k = 0; k < c; ++k) {
        double s2 = 0;
        for (int j = 0; j < hw; ++j) s2 += (double)x[(size_t)k * hw + j] * x[(size_t)k * hw + j];
        ms[k] = (float)(s2 / hw);
    }
}

/* Random weights for a convolution, calibrated on its actual input (state.input). */
static void init_convolutional(layer *l, network_state state)
{
    int fan_in = l->size * l->size * l->c / l->groups;
    float a = sqrtf(3.0f / fan_in);  /* uniform(-a, a) has variance 1/fan_in */
    fill(l->weights, l->nweights, -a, a);
    ACTIVATION act = l->activation;
    l->activation = LINEAR;
    int hw = l->out_h * l->out_w;
    if (l->batch_normalize) {
        for (int k = 0; k < l->n; ++k) {
            l->scales[k] = 1;
            l->biases[k] = 0;
            l->rolling_mean[k] = 0;
            l->rolling_variance[k] = 1;
        }
        l->forward(*l, state);
        /* Normalised by the channel's root mean square, not by its spread around the mean, and by no less than
         * 0.7 of the layer's or of its input's (what a random convolution gives on average): a channel whose
         * values are nearly equal, or whose sum nearly cancels on a small map (a 1x1 squeeze-excitation output),
         * would otherwise amplify the rounding differences of its convolution, and deep nets compound them. */
        channel_mean_square(l->output, l->n, hw, l->rolling_variance);
        double layer_ms = 0, input_ms = 0;
        for (int k = 0; k < l->n; ++k) layer_ms += l->rolling_variance[k] / l->n;
        for (int j = 0; j < l->inputs; ++j) input_ms += (double)state.input[j] * state.input[j] / l->inputs;
        double floor_d = 0.5 * (layer_ms > input_ms ? layer_ms : input_ms);
        float floor_ms = floor_d > 1e-8 ? (float)floor_d : 1e-8f;
        for (int k = 0; k < l->n; ++k) {
            float ms = l->rolling_variance[k] > floor_ms ? l->rolling_variance[k] : floor_ms;
            l->rolling_variance[k] = ms * uniform(0.8f, 1.25f);
            l->rolling_mean[k] = uniform(-0.5f, 0.5f) * sqrtf(ms);
            l->scales[k] = uniform(0.5f, 1.5f);
            l->biases[k] = uniform(-0.5f, 0.5f);
        }
    } else {
        for (int k = 0; k < l->n; ++k) l->biases[k] = 0;
        l->forward(*l, state);
        double s2 = 0;
        size_t count = (size_t)l->n * hw;
        for (size_t j = 0; j < count; ++j) s2 += (double)l->output[j] * l->output[j];
        float spread = (float)sqrt(s2 / (count ? count : 1));
        float gain = spread > 1e-6f ? 1.5f / spread : 1.0f;  /* logits of spread ~1.5 reach both ends of a sigmoid */
        for (int j = 0; j < l->nweights; ++j) l->weights[j] *= gain;
        fill(l->biases, l->n, -0.5f, 0.5f);
    }
    l->activation = act;
}

/* Seeded weights for every layer that has any, each calibrated on the output of the layers before it. */
static void init_weights(network *net, float *input)
{
    network_state state = {0};
    state.net = *net;
    state.input = input;
    state.workspace = net->workspace;
    for (int i = 0; i < net->n; ++i) {
        state.index = i;
        layer *l = &net->layers[i];
        if (l->type == CONVOLUTIONAL && !l->share_layer) {
            if (l->binary || l->xnor) die(g_cfg, "binary / xnor convolutions are not filled by this harness");
            init_convolutional(l, state);
        } else if (l->type == SHORTCUT && l->nweights > 0) {
            fill(l->weights, l->nweights, 0.5f, 1.5f);
        } else if (l->type == IMPLICIT) {
            fill(l->weights, l->nweights, -0.5f, 0.5f);
        } else if (l->type == BATCHNORM) {
            fill(l->scales, l->c, 0.5f, 1.5f);
            fill(l->biases, l->c, -0.5f, 0.5f);
            fill(l->rolling_mean, l->c, -0.1f, 0.1f);
            fill(l->rolling_variance, l->c, 0.8f, 1.25f);
        } else if (l->type == CONNECTED || l->type == LOCAL || l->type == RNN || l->type == GRU || l->type == LSTM ||
                   l->type == CRNN || l->type == CONV_LSTM || l->type == DECONVOLUTIONAL) {
            die(g_cfg, "a layer type with weights this harness does not fill (connected / local / recurrent / "
                       "deconvolutional)");
        }
        l->forward(*l, state);
        state.input = l->output;
    }
}

int main(int argc, char **argv)
{
    if (argc < 4 || argc > 5 || (argc == 5 && strcmp(argv[4], "all"))) {
        fprintf(stderr, "usage: net_harness CFG DIR SEED [all]\n");
        return 2;
    }
    char *cfg = argv[1];
    const char *dir = argv[2];
    g_cfg = cfg;
    g_state = strtoull(argv[3], NULL, 10);
    int dump_all = argc == 5;
    char path[4096];

    network net = parse_network_cfg_custom(cfg, 1, 1);  /* batch 1, inference memory, as detector test */
    size_t n_in = (size_t)net.c * net.h * net.w;
    float *input = (float *)calloc(n_in, sizeof(float));
    snprintf(path, sizeof path, "%s/input.bin", dir);
    read_floats(path, input, n_in);

    init_weights(&net, input);
    snprintf(path, sizeof path, "%s/darknet.weights", dir);
    save_weights(net, path);

    network_predict(net, input);

    snprintf(path, sizeof path, "%s/layers.tsv", dir);
    FILE *f = fopen(path, "w");
    if (!f) die(path, "cannot create");
    for (int i = 0; i < net.n; ++i) {
        layer l = net.layers[i];
        fprintf(f, "%d\t%s\t%d\t%d\t%d\t%d", i, get_layer_string(l.type), l.out_c, l.out_h, l.out_w, l.outputs);
        if (is_head(l.type)) fprintf(f, "\t%d\t%d\t%d", l.n, l.classes, l.coords);
        fprintf(f, "\n");
        int wanted = dump_all || is_head(l.type) || (i + 1 < net.n && is_head(net.layers[i + 1].type));
        if (wanted) {
            snprintf(path, sizeof path, "%s/out_%d.bin", dir, i);
            write_floats(path, l.output, (size_t)l.outputs);
        }
    }
    fclose(f);

    int nboxes = 0;
    detection *dets = get_network_boxes(&net, net.w, net.h, 0, 0.5f, 0, 1, &nboxes, net.letter_box);
    int classes = nboxes ? dets[0].classes : 0;
    int has_uc = nboxes && dets[0].uc;
    int row = 5 + classes + (has_uc ? 4 : 0);
    float *rows = (float *)calloc((size_t)(nboxes ? nboxes : 1) * row, sizeof(float));
    for (int i = 0; i < nboxes; ++i) {
        float *r = rows + (size_t)i * row;
        r[0] = dets[i].bbox.x;
        r[1] = dets[i].bbox.y;
        r[2] = dets[i].bbox.w;
        r[3] = dets[i].bbox.h;
        r[4] = dets[i].objectness;
        memcpy(r + 5, dets[i].prob, classes * sizeof(float));
        if (has_uc) memcpy(r + 5 + classes, dets[i].uc, 4 * sizeof(float));
    }
    snprintf(path, sizeof path, "%s/boxes.bin", dir);
    write_floats(path, rows, (size_t)nboxes * row);
    snprintf(path, sizeof path, "%s/boxes.txt", dir);
    f = fopen(path, "w");
    if (!f) die(path, "cannot create");
    fprintf(f, "count %d\nclasses %d\nrow %d\nuc %d\nletter_box %d\nnet %d %d %d\n", nboxes, classes, row, has_uc,
            net.letter_box, net.c, net.h, net.w);
    fclose(f);
    free_detections(dets, nboxes);
    free(rows);
    free(input);
    free_network(net);
    return 0;
}
