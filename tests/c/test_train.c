/* test_train.c - C-level tests of training (csrc/train.c), run under AddressSanitizer/LeakSanitizer
 * by .ci/run: steps give finite losses and are deterministic, the graph cache evicts and grows its
 * arena safely, evaluation equals the inference model built from the same parameters, and bad
 * arguments are status codes. Usage: test_train <weights.safetensors> */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "model.h"
#include "train.h"

static void fill(float *a, size_t n, unsigned seed)
{
    srand(seed);
    for (size_t i = 0; i < n; i++)
        a[i] = (float)rand() / (float)RAND_MAX;
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s weights.safetensors\n", argv[0]);
        return 2;
    }
    ds_model *model = NULL;
    if (ds_model_load(&model, argv[1], DS_MATH_FLOAT32) != DS_OK) {
        fprintf(stderr, "cannot load %s: %s\n", argv[1], ds_last_error());
        return 1;
    }
    enum { B = 2, H = 16, W = 24 };
    size_t n = (size_t)B * H * W;
    float *x = malloc(n * sizeof(float)), *t = malloc(n * sizeof(float)), *pred = malloc(n * sizeof(float));
    float *ref = malloc(n * sizeof(float));
    fill(x, n, 1);
    fill(t, n, 2);

    ds_train_config cfg;
    ds_train_config_default(&cfg);
    cfg.seed = 42;
    ds_trainer *a = NULL, *b = NULL;
    CHECK(ds_trainer_create(&a, ds_model_parameters(model), &cfg) == DS_OK, "create: %s", ds_last_error());
    CHECK(ds_trainer_create(&b, ds_model_parameters(model), &cfg) == DS_OK, "create: %s", ds_last_error());
    if (a && b) {
        ds_loss_value la, lb;
        for (int i = 0; i < 3; i++) {
            CHECK(ds_trainer_step(a, B, H, W, x, t, &la) == DS_OK, "step: %s", ds_last_error());
            CHECK(ds_trainer_step(b, B, H, W, x, t, &lb) == DS_OK, "step: %s", ds_last_error());
            CHECK(isfinite(la.loss) && la.loss == lb.loss, "step %d: losses %g and %g", i, la.loss, lb.loss);
        }
        CHECK(ds_trainer_step_count(a) == 3, "step count %ld", ds_trainer_step_count(a));
        const char *name = "trunk.block03.conv2.weight";
        const ds_param_entry *e = NULL;
        CHECK(ds_trainer_find_tensor(a, name, &e) == DS_OK, "find: %s", ds_last_error());
        if (e) {
            float *wa = malloc(e->count * sizeof(float)), *wb = malloc(e->count * sizeof(float));
            CHECK(ds_trainer_read_tensor(a, name, wa) == DS_OK && ds_trainer_read_tensor(b, name, wb) == DS_OK &&
                      memcmp(wa, wb, e->count * sizeof(float)) == 0,
                  "two trainers with one seed differ");
            /* a written tensor reads back; non-finite values are refused */
            wa[0] += 1.0f;
            CHECK(ds_trainer_write_tensor(b, name, wa) == DS_OK && ds_trainer_read_tensor(b, name, wb) == DS_OK &&
                      wb[0] == wa[0],
                  "write/read: %s", ds_last_error());
            wa[1] = NAN;
            CHECK(ds_trainer_write_tensor(b, name, wa) == DS_ERR_VALUE, "NaN parameter accepted");
            free(wa);
            free(wb);
        }

        /* shapes beyond the graph cache (4): eviction and arena growth */
        static const int shapes[][3] = {{1, 8, 8}, {1, 16, 16}, {2, 8, 16}, {1, 32, 8}, {3, 8, 8}, {2, 16, 24}};
        for (size_t s = 0; s < sizeof shapes / sizeof *shapes; s++) {
            size_t m = (size_t)shapes[s][0] * shapes[s][1] * shapes[s][2];
            float *xs = malloc(m * sizeof(float)), *ts = malloc(m * sizeof(float));
            fill(xs, m, 10 + (unsigned)s);
            fill(ts, m, 20 + (unsigned)s);
            ds_loss_value l;
            CHECK(ds_trainer_compute_gradients(a, shapes[s][0], shapes[s][1], shapes[s][2], xs, ts, &l) == DS_OK &&
                      isfinite(l.loss),
                  "shape %zu: %s", s, ds_last_error());
            free(xs);
            free(ts);
        }
        CHECK(ds_trainer_step_count(a) == 3, "gradients changed the step count");

        /* evaluation equals the inference model made from the same parameters */
        ds_model *copy = NULL;
        CHECK(ds_trainer_to_model(a, &copy) == DS_OK, "to model: %s", ds_last_error());
        ds_loss_value le;
        CHECK(ds_trainer_evaluate(a, B, H, W, x, t, pred, &le) == DS_OK, "evaluate: %s", ds_last_error());
        if (copy) {
            CHECK(ds_model_forward(copy, B, H, W, x, ref) == DS_OK, "forward: %s", ds_last_error());
            float worst = 0.0f;
            for (size_t i = 0; i < n; i++)
                worst = fmaxf(worst, fabsf(pred[i] - ref[i]));
            CHECK(worst < 1e-5f, "evaluate and the inference model differ by %g", worst);
            ds_model_free(copy);
        }

        /* bad arguments are status codes */
        CHECK(ds_trainer_step(a, B, 12, W, x, t, NULL) == DS_ERR_VALUE, "height 12 accepted");
        CHECK(ds_trainer_step(a, 0, H, W, x, t, NULL) == DS_ERR_VALUE, "batch 0 accepted");
        CHECK(ds_trainer_step(a, B, H, W, x, NULL, NULL) == DS_ERR_VALUE, "missing targets accepted");
        x[5] = NAN;
        CHECK(ds_trainer_step(a, B, H, W, x, t, NULL) == DS_ERR_VALUE, "NaN image accepted");
        CHECK(ds_trainer_step_count(a) == 3, "a refused step counted");
        CHECK(ds_trainer_find_tensor(a, "adam.m.nothing", &e) == DS_ERR_VALUE, "unknown tensor found");
        CHECK(ds_trainer_load(a, "/nonexistent/checkpoint.safetensors") == DS_ERR_IO, "missing checkpoint accepted");
        ds_train_config bad = cfg;
        bad.dropout_rate = 1.0f;
        CHECK(ds_trainer_set_config(a, &bad) == DS_ERR_VALUE, "dropout 1 accepted");
        CHECK(ds_trainer_num_tensors(a) > 200 && ds_trainer_tensor_entry(a, -1) == NULL, "tensor table");
        bad = cfg;
        bad.bn_frozen = 1;
        CHECK(ds_trainer_set_config(a, &bad) == DS_ERR_VALUE, "batch norm mode changed after creation");
    }

    /* frozen batch norms: a step is the inference forward (dropout off), keeps the moving statistics */
    x[5] = 0.5f;
    ds_train_config frozen_cfg = cfg;
    frozen_cfg.bn_frozen = 1;
    frozen_cfg.dropout_rate = 0.0f;
    ds_trainer *f = NULL;
    CHECK(ds_trainer_create(&f, ds_model_parameters(model), &frozen_cfg) == DS_OK, "create frozen: %s",
          ds_last_error());
    if (f) {
        const char *stat = "trunk.block05.bn2.moving_variance";
        const ds_param_entry *e = NULL;
        CHECK(ds_trainer_find_tensor(f, stat, &e) == DS_OK, "find: %s", ds_last_error());
        ds_loss_value le, ls;
        CHECK(ds_trainer_evaluate(f, B, H, W, x, t, NULL, &le) == DS_OK, "evaluate: %s", ds_last_error());
        if (e) {
            float *before = malloc(e->count * sizeof(float)), *after = malloc(e->count * sizeof(float));
            CHECK(ds_trainer_read_tensor(f, stat, before) == DS_OK, "read: %s", ds_last_error());
            CHECK(ds_trainer_step(f, B, H, W, x, t, &ls) == DS_OK, "frozen step: %s", ds_last_error());
            CHECK(ds_trainer_read_tensor(f, stat, after) == DS_OK &&
                      memcmp(before, after, e->count * sizeof(float)) == 0,
                  "a frozen batch norm changed its moving statistics");
            CHECK(fabs(ls.loss - le.loss) <= 1e-5 * le.loss, "frozen step loss %g, inference loss %g", ls.loss,
                  le.loss);
            free(before);
            free(after);
        }
    }
    ds_trainer_free(f);
    ds_trainer_free(a);
    ds_trainer_free(b);
    ds_model_free(model);
    free(x);
    free(t);
    free(pred);
    free(ref);
    if (check_failures) {
        fprintf(stderr, "%d check(s) failed\n", check_failures);
        return 1;
    }
    printf("test_train: all checks passed\n");
    return 0;
}
