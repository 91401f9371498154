/*
 * C tests of libkvroute through the committed header: routing, the recorded vLLM event
 * payloads, lifecycle, workers, load reports, block keys, snapshots, statistics, every
 * result code reachable through the API, and concurrent use from several threads.
 *
 * Usage: test_router VECTORS_FILE   (the file extract_vectors.py writes)
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include "kvroute.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int g_checks = 0;
static int g_failures = 0;

#define CHECK(cond)                                                                   \
  do {                                                                                \
    g_checks++;                                                                       \
    if (!(cond)) {                                                                    \
      g_failures++;                                                                   \
      fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);        \
    }                                                                                 \
  } while (0)

#define CHECK_RC(expr, want)                                                          \
  do {                                                                                \
    kvroute_result rc_ = (expr);                                                      \
    g_checks++;                                                                       \
    if (rc_ != (kvroute_result)(want)) {                                              \
      char msg_[512];                                                                 \
      size_t n_ = 0;                                                                  \
      kvroute_last_error_message(msg_, sizeof msg_, &n_);                             \
      g_failures++;                                                                   \
      fprintf(stderr, "%s:%d: %s returned %u (%s), want %u: %s\n", __FILE__,          \
              __LINE__, #expr, (unsigned)rc_, kvroute_result_str(rc_),                \
              (unsigned)(want), msg_);                                                \
    }                                                                                 \
  } while (0)

/* ----- test vectors ------------------------------------------------------------------ */

#define MAX_BATCHES 16

typedef struct {
  char name[128];
  size_t held; /* distinct blocks held after the batch (reference model) */
  uint8_t *bytes;
  size_t len;
} batch;

static batch g_batches[MAX_BATCHES];
static size_t g_nbatches = 0;
static uint64_t g_r1_hashes[16];
static size_t g_nr1 = 0;

static int hexval(int c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

static int load_vectors(const char *path) {
  FILE *f = fopen(path, "r");
  if (!f) {
    perror(path);
    return -1;
  }
  static char line[1 << 16];
  while (fgets(line, sizeof line, f)) {
    if (line[0] == 'P' && g_nbatches < MAX_BATCHES) {
      batch *b = &g_batches[g_nbatches];
      char *hex = malloc(sizeof line);
      if (!hex || sscanf(line, "P %127s %zu %65535s", b->name, &b->held, hex) != 3) {
        free(hex);
        fclose(f);
        return -1;
      }
      size_t n = strlen(hex) / 2;
      b->bytes = malloc(n);
      for (size_t i = 0; i < n; i++) {
        b->bytes[i] = (uint8_t)(hexval(hex[2 * i]) * 16 + hexval(hex[2 * i + 1]));
      }
      b->len = n;
      free(hex);
      g_nbatches++;
    } else if (line[0] == 'H') {
      char *p = line + 1;
      char *end;
      while (g_nr1 < 16) {
        unsigned long long v = strtoull(p, &end, 10);
        if (end == p) break;
        g_r1_hashes[g_nr1++] = (uint64_t)v;
        p = end;
      }
    }
  }
  fclose(f);
  return (g_nbatches > 0 && g_nr1 > 0) ? 0 : -1;
}

static void free_vectors(void) {
  for (size_t i = 0; i < g_nbatches; i++) free(g_batches[i].bytes);
}

/* ----- helpers ------------------------------------------------------------------------ */

static kvroute_router *new_router(const char *json) {
  kvroute_router *r = NULL;
  CHECK_RC(kvroute_router_new(json, &r), KVROUTE_RESULT_OK);
  return r;
}

static void iota(uint32_t *t, size_t n) {
  for (size_t i = 0; i < n; i++) t[i] = (uint32_t)i;
}

/* The number after "key": in a JSON text (first occurrence), or -1. */
static long long json_number(const char *json, const char *key) {
  char pat[128];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  return p ? strtoll(p + strlen(pat), NULL, 10) : -1;
}

/* The floating-point number after "key": in a JSON text, or NAN. */
static double json_double(const char *json, const char *key) {
  char pat[128];
  snprintf(pat, sizeof pat, "\"%s\":", key);
  const char *p = strstr(json, pat);
  return p ? strtod(p + strlen(pat), NULL) : NAN;
}

static long long holder_blocks(const kvroute_router *r) {
  char *json = NULL;
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  long long n = json ? json_number(json, "holder_blocks") : -1;
  kvroute_string_free(json);
  return n;
}

/* ----- tests ------------------------------------------------------------------------- */

static void test_version_and_result_strings(void) {
  char buf[32];
  snprintf(buf, sizeof buf, "%d.%d.%d", KVROUTE_VERSION_MAJOR, KVROUTE_VERSION_MINOR,
           KVROUTE_VERSION_PATCH);
  CHECK(strcmp(buf, KVROUTE_VERSION) == 0);
  CHECK(strcmp(kvroute_version(), KVROUTE_VERSION) == 0);
  CHECK(strcmp(kvroute_result_str(KVROUTE_RESULT_OK), "ok") == 0);
  CHECK(strcmp(kvroute_result_str(KVROUTE_RESULT_NO_WORKERS), "no worker available") == 0);
  CHECK(strcmp(kvroute_result_str(KVROUTE_RESULT_NULL_POINTER), "null pointer") == 0);
  CHECK(strcmp(kvroute_result_str(9999), "unknown result code") == 0);
  /* Every code has a distinct string. */
  const unsigned codes[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 100, 101, 102, 103};
  size_t n = sizeof codes / sizeof codes[0];
  for (size_t i = 0; i < n; i++) {
    CHECK(strcmp(kvroute_result_str(codes[i]), "unknown result code") != 0);
    for (size_t j = i + 1; j < n; j++) {
      CHECK(strcmp(kvroute_result_str(codes[i]), kvroute_result_str(codes[j])) != 0);
    }
  }
}

static void test_config_errors(void) {
  kvroute_router *r = (kvroute_router *)0x1;
  CHECK_RC(kvroute_router_new("{\"profil\": \"llm-d\"}", &r), KVROUTE_RESULT_CONFIG);
  CHECK(r == (kvroute_router *)0x1); /* outputs are written only on success */
  /* The last error names the bad field. */
  char msg[512];
  size_t len = 0;
  CHECK_RC(kvroute_last_error_message(msg, sizeof msg, &len), KVROUTE_RESULT_OK);
  CHECK(len == strlen(msg) && strstr(msg, "profil") != NULL);
  /* Too small a buffer: the needed length comes back, the buffer is untouched. */
  char small[4] = "xyz";
  size_t need = 0;
  CHECK_RC(kvroute_last_error_message(small, sizeof small, &need),
           KVROUTE_RESULT_BUFFER_TOO_SMALL);
  CHECK(need == len && strcmp(small, "xyz") == 0);
  CHECK_RC(kvroute_last_error_message(NULL, 0, &need), KVROUTE_RESULT_BUFFER_TOO_SMALL);
  CHECK_RC(kvroute_last_error_message(msg, sizeof msg, NULL), KVROUTE_RESULT_NULL_POINTER);

  CHECK_RC(kvroute_router_new("not json", &r), KVROUTE_RESULT_CONFIG);
  CHECK_RC(kvroute_router_new("{\"hash_algo\": \"xxhash\"}", &r), KVROUTE_RESULT_MISSING_SEED);
  CHECK_RC(kvroute_router_new("{\"workers\": [{\"name\": \"a\"}, {\"name\": \"a\"}]}", &r),
           KVROUTE_RESULT_WORKER_EXISTS);
  CHECK_RC(kvroute_router_new(NULL, &r), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_new("{}", NULL), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_new("{\"seed\": \"\xff\xfe\"}", &r), KVROUTE_RESULT_INVALID_UTF8);
  CHECK(r == (kvroute_router *)0x1);

  /* A success clears the thread's last error. */
  kvroute_router *ok = new_router("{}");
  CHECK_RC(kvroute_last_error_message(msg, sizeof msg, &len), KVROUTE_RESULT_OK);
  CHECK(len == 0 && msg[0] == '\0');
  kvroute_router_free(ok);
  kvroute_router_free(NULL); /* no-op */
}

static void test_route_and_candidates(void) {
  kvroute_router *r = new_router("{\"workers\": [{\"name\": \"pod-a\"}, {\"name\": \"pod-b\", "
                                 "\"dp_rank\": 1}]}");
  uint32_t t[64];
  iota(t, 64);
  kvroute_decision_info info;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route(r, t, 64, "10.0.0.1", NULL, NULL, &info, &d),
           KVROUTE_RESULT_OK);
  CHECK(d != NULL);
  CHECK(info.prompt_tokens == 64 && info.total_blocks == 4 && info.matched_blocks == 0);
  CHECK(info.num_candidates == 2);
  CHECK(info.worker_len == strlen(info.worker));
  CHECK((strcmp(info.worker, "pod-a") == 0 && info.dp_rank == 0) ||
        (strcmp(info.worker, "pod-b") == 0 && info.dp_rank == 1));
  const char *whole = NULL;
  CHECK_RC(kvroute_decision_worker(d, &whole), KVROUTE_RESULT_OK);
  CHECK(whole && strcmp(whole, info.worker) == 0);
  kvroute_decision_info again;
  CHECK_RC(kvroute_decision_get_info(d, &again), KVROUTE_RESULT_OK);
  CHECK(again.request_id == info.request_id && strcmp(again.worker, info.worker) == 0);

  /* The chosen worker is among the candidates and has the best total. */
  double best = -INFINITY, chosen_total = NAN;
  int seen_a = 0, seen_b = 0;
  for (size_t i = 0; i < info.num_candidates; i++) {
    kvroute_candidate c;
    CHECK_RC(kvroute_decision_candidate(d, i, &c), KVROUTE_RESULT_OK);
    seen_a += strcmp(c.worker, "pod-a") == 0;
    seen_b += strcmp(c.worker, "pod-b") == 0;
    CHECK(c.matched_blocks == 0 && c.num_scores > 0 && isfinite(c.total));
    for (size_t j = 0; j < c.num_scores; j++) {
      const char *name = NULL;
      double v = NAN;
      CHECK_RC(kvroute_decision_score(d, i, j, &name, &v), KVROUTE_RESULT_OK);
      CHECK(name != NULL && name[0] != '\0' && isfinite(v));
    }
    if (c.total > best) best = c.total;
    if (strcmp(c.worker, info.worker) == 0 && c.dp_rank == info.dp_rank) chosen_total = c.total;
  }
  CHECK(seen_a == 1 && seen_b == 1);
  CHECK(chosen_total == best);
  kvroute_candidate c;
  const char *name = NULL;
  double v;
  CHECK_RC(kvroute_decision_candidate(d, 2, &c), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_decision_score(d, 0, 1000, &name, &v), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_decision_score(d, 5, 0, &name, &v), KVROUTE_RESULT_INVALID_INPUT);
  CHECK(name == NULL);
  CHECK_RC(kvroute_decision_candidate(NULL, 0, &c), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_decision_candidate(d, 0, NULL), KVROUTE_RESULT_NULL_POINTER);

  /* Lifecycle. */
  CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_INVALID_INPUT); /* twice */
  CHECK_RC(kvroute_router_on_first_token(r, info.request_id), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_on_finished(r, info.request_id), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_on_finished(r, info.request_id), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_on_first_token(r, 987654321), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_on_routed(r, NULL), KVROUTE_RESULT_NULL_POINTER);
  kvroute_decision_free(d);
  kvroute_decision_free(NULL);

  /* Without a decision handle; an empty prompt with a NULL token pointer. */
  CHECK_RC(kvroute_router_route(r, NULL, 0, NULL, NULL, NULL, &info, NULL), KVROUTE_RESULT_OK);
  CHECK(info.prompt_tokens == 0 && info.total_blocks == 0);
  /* Errors. */
  CHECK_RC(kvroute_router_route(r, NULL, 3, NULL, NULL, NULL, &info, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_route(NULL, t, 64, NULL, NULL, NULL, &info, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, NULL, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_route(r, t, 64, "\xc3\x28", NULL, NULL, &info, NULL),
           KVROUTE_RESULT_INVALID_UTF8);
  /* LoRA and cache salt are accepted. */
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, "sql-lora", "tenant-a", &info, NULL),
           KVROUTE_RESULT_OK);
  kvroute_router_free(r);

  /* No workers; token outside the vocabulary. */
  r = new_router("{}");
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &info, NULL),
           KVROUTE_RESULT_NO_WORKERS);
  kvroute_router_free(r);
  r = new_router("{\"vocab_size\": 50, \"workers\": [{\"name\": \"a\"}]}");
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &info, NULL),
           KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_route(r, t, 50, NULL, NULL, NULL, &info, NULL), KVROUTE_RESULT_OK);
  kvroute_router_free(r);
}

static void test_long_worker_name(void) {
  char name[400];
  memset(name, 'w', sizeof name - 1);
  name[sizeof name - 1] = '\0';
  kvroute_router *r = new_router("{}");
  CHECK_RC(kvroute_router_add_worker(r, name, 0), KVROUTE_RESULT_OK);
  uint32_t t[16];
  iota(t, 16);
  kvroute_decision_info info;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route(r, t, 16, NULL, NULL, NULL, &info, &d), KVROUTE_RESULT_OK);
  CHECK(info.worker_len == strlen(name));
  CHECK(strlen(info.worker) == KVROUTE_WORKER_NAME_CAPACITY - 1);
  CHECK(strncmp(info.worker, name, KVROUTE_WORKER_NAME_CAPACITY - 1) == 0);
  const char *whole = NULL;
  CHECK_RC(kvroute_decision_worker(d, &whole), KVROUTE_RESULT_OK);
  CHECK(whole && strcmp(whole, name) == 0);
  kvroute_decision_free(d);
  kvroute_router_free(r);
}

static void test_events(void) {
  kvroute_router *r = new_router("{\"hash_algo\": \"sha256\", \"profile\": \"prefix\", "
                                 "\"workers\": [{\"name\": \"pod-a\"}, {\"name\": \"pod-b\"}]}");
  uint32_t t[100];
  iota(t, 100);

  /* The router's own sha256 block keys of tokens 0..99 are vLLM's recorded hashes. */
  uint64_t keys[16];
  size_t nkeys = 16;
  CHECK_RC(kvroute_router_block_keys(r, t, 100, NULL, NULL, keys, &nkeys), KVROUTE_RESULT_OK);
  CHECK(nkeys == g_nr1);
  for (size_t i = 0; i < nkeys && i < g_nr1; i++) CHECK(keys[i] == g_r1_hashes[i]);
  size_t small = 2;
  keys[0] = 0;
  CHECK_RC(kvroute_router_block_keys(r, t, 100, NULL, NULL, keys, &small),
           KVROUTE_RESULT_BUFFER_TOO_SMALL);
  CHECK(small == g_nr1 && keys[0] == 0);
  size_t zero = 0;
  CHECK_RC(kvroute_router_block_keys(r, t, 100, NULL, NULL, NULL, &zero),
           KVROUTE_RESULT_BUFFER_TOO_SMALL);
  CHECK(zero == g_nr1);
  CHECK_RC(kvroute_router_block_keys(r, t, 100, NULL, NULL, keys, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  /* A cache salt changes block 0's key and so every key after it. */
  uint64_t salted[16];
  size_t nsalted = 16;
  CHECK_RC(kvroute_router_block_keys(r, t, 100, NULL, "tenant-a", salted, &nsalted),
           KVROUTE_RESULT_OK);
  CHECK(nsalted == g_nr1 && salted[0] != keys[0]);

  for (size_t i = 0; i < g_nbatches; i++) {
    kvroute_apply_report rep;
    memset(&rep, 0xff, sizeof rep);
    CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", g_batches[i].bytes, g_batches[i].len,
                                             &rep),
             KVROUTE_RESULT_OK);
    CHECK(rep.events > 0 && rep.events < 1000);
    long long held = holder_blocks(r);
    if (held != (long long)g_batches[i].held) {
      fprintf(stderr, "after %s: index holds %lld blocks, reference %zu\n", g_batches[i].name,
              held, g_batches[i].held);
    }
    CHECK(held == (long long)g_batches[i].held);
    if (i == 0) {
      CHECK(strcmp(g_batches[i].name, "r1") == 0);
      CHECK(rep.blocks_stored == 6 && rep.hashes_verified == 6);
      kvroute_decision_info info;
      kvroute_decision *d = NULL;
      CHECK_RC(kvroute_router_route(r, t, 100, NULL, NULL, NULL, &info, &d), KVROUTE_RESULT_OK);
      CHECK(strcmp(info.worker, "pod-a") == 0);
      CHECK(info.matched_blocks == 6 && info.total_blocks == 6);
      for (size_t c = 0; c < info.num_candidates; c++) {
        kvroute_candidate cand;
        CHECK_RC(kvroute_decision_candidate(d, c, &cand), KVROUTE_RESULT_OK);
        CHECK(cand.matched_blocks == (strcmp(cand.worker, "pod-a") == 0 ? 6u : 0u));
        if (strcmp(cand.worker, "pod-a") == 0) CHECK(cand.matched_by_tier[0] == 6);
      }
      kvroute_decision_free(d);

      /* Snapshot now and restore into a fresh router: it routes the same. */
      uint8_t *snap = NULL;
      size_t snap_len = 0;
      CHECK_RC(kvroute_router_snapshot(r, &snap, &snap_len), KVROUTE_RESULT_OK);
      CHECK(snap != NULL && snap_len > 12);
      kvroute_router *r2 = new_router("{\"hash_algo\": \"sha256\", \"profile\": \"prefix\"}");
      CHECK_RC(kvroute_router_restore(r2, snap, snap_len), KVROUTE_RESULT_OK);
      CHECK(holder_blocks(r2) == 6);
      CHECK_RC(kvroute_router_route(r2, t, 100, NULL, NULL, NULL, &info, NULL),
               KVROUTE_RESULT_OK);
      CHECK(strcmp(info.worker, "pod-a") == 0 && info.matched_blocks == 6);
      /* A corrupt snapshot changes nothing. */
      snap[0] ^= 0xff;
      CHECK_RC(kvroute_router_restore(r2, snap, snap_len), KVROUTE_RESULT_SNAPSHOT);
      CHECK_RC(kvroute_router_restore(r2, snap, 5), KVROUTE_RESULT_SNAPSHOT);
      CHECK_RC(kvroute_router_restore(r2, NULL, 0), KVROUTE_RESULT_SNAPSHOT);
      CHECK_RC(kvroute_router_restore(r2, NULL, 10), KVROUTE_RESULT_NULL_POINTER);
      CHECK(holder_blocks(r2) == 6);
      kvroute_bytes_free(snap, snap_len);
      kvroute_bytes_free(NULL, 0);
      kvroute_router_free(r2);
    }
  }

  /* Bad batches are rejected and change nothing. */
  long long before = holder_blocks(r);
  const batch *b0 = &g_batches[0];
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-z", b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_UNKNOWN_WORKER);
  const uint8_t junk[] = {0x93, 0xff};
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", junk, sizeof junk, NULL),
           KVROUTE_RESULT_DECODE);
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", b0->bytes, b0->len / 2, NULL),
           KVROUTE_RESULT_DECODE);
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", NULL, 0, NULL), KVROUTE_RESULT_DECODE);
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", NULL, 4, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_apply_vllm_batch(r, NULL, b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-\xff", b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_INVALID_UTF8);
  CHECK(holder_blocks(r) == before);

  /* Statistics and Prometheus text. */
  char *json = NULL, *prom = NULL;
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  CHECK(json && json_number(json, "routes") == 1);
  CHECK(json && json_number(json, "event_batches") == (long long)g_nbatches);
  kvroute_string_free(json);
  CHECK_RC(kvroute_router_prometheus(r, &prom), KVROUTE_RESULT_OK);
  CHECK(prom && strstr(prom, "# TYPE kvroute_routes_total counter\nkvroute_routes_total 1\n"));
  kvroute_string_free(prom);
  kvroute_string_free(NULL);
  CHECK_RC(kvroute_router_prometheus(r, NULL), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_metrics_json(NULL, &json), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_snapshot(r, NULL, NULL), KVROUTE_RESULT_NULL_POINTER);
  kvroute_router_free(r);

  /* Block size and hash mismatches. */
  r = new_router("{\"block_size\": 32, \"workers\": [{\"name\": \"pod-a\"}]}");
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_BLOCK_SIZE_MISMATCH);
  kvroute_router_free(r);
  r = new_router("{\"hash_algo\": \"sha256\", \"hash_seed\": \"0\", \"workers\": [{\"name\": "
                 "\"pod-a\"}]}");
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_HASH_MISMATCH);
  char msg[1024];
  size_t len;
  CHECK_RC(kvroute_last_error_message(msg, sizeof msg, &len), KVROUTE_RESULT_OK);
  CHECK(strstr(msg, "PYTHONHASHSEED") != NULL);
  CHECK(holder_blocks(r) == 0);
  kvroute_router_free(r);
  /* Approximate mode takes no events: a configuration error. */
  r = new_router("{\"mode\": \"approximate\", \"workers\": [{\"name\": \"pod-a\"}]}");
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", b0->bytes, b0->len, NULL),
           KVROUTE_RESULT_CONFIG);
  kvroute_router_free(r);
}

static void test_workers_and_load(void) {
  kvroute_router *r = new_router("{\"profile\": \"prefix\", \"mode\": \"approximate\"}");
  CHECK_RC(kvroute_router_add_worker(r, "a", 0), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_add_worker(r, "b", 0), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_add_worker(r, "a", 0), KVROUTE_RESULT_WORKER_EXISTS);
  CHECK_RC(kvroute_router_add_worker(r, "", 0), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_add_worker(r, NULL, 0), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_remove_worker(r, "zzz", 0), KVROUTE_RESULT_UNKNOWN_WORKER);
  CHECK_RC(kvroute_router_set_healthy(r, "zzz", 0, false), KVROUTE_RESULT_UNKNOWN_WORKER);
  CHECK_RC(kvroute_router_drain_worker(r, "a", 7, true), KVROUTE_RESULT_UNKNOWN_WORKER);

  /* Approximate mode: the first request's blocks are predicted on its worker, so the
   * second request with the same prefix follows it. */
  uint32_t t[64];
  iota(t, 64);
  kvroute_decision_info first, second;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &first, &d), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_OK);
  kvroute_decision_free(d);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(first.worker, second.worker) == 0 && second.matched_blocks == 4);
  const char *other = strcmp(first.worker, "a") == 0 ? "b" : "a";

  /* Draining the holder sends the request elsewhere despite the prefix. */
  CHECK_RC(kvroute_router_drain_worker(r, first.worker, 0, true), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(second.worker, other) == 0 && second.matched_blocks == 0);
  CHECK_RC(kvroute_router_drain_worker(r, first.worker, 0, false), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_set_healthy(r, first.worker, 0, false), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(second.worker, other) == 0);
  CHECK_RC(kvroute_router_set_healthy(r, other, 0, false), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL),
           KVROUTE_RESULT_NO_WORKERS);
  CHECK_RC(kvroute_router_set_healthy(r, first.worker, 0, true), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_set_healthy(r, other, 0, true), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(second.worker, first.worker) == 0);

  /* Load reports. */
  const char *loras[] = {"sql-lora", "chat-lora"};
  kvroute_load_report rep = {3, 2, 0.5, loras, 2};
  CHECK_RC(kvroute_router_report_load(r, "a", 0, &rep), KVROUTE_RESULT_OK);
  kvroute_load_report none = {-1, -1, NAN, NULL, 0};
  CHECK_RC(kvroute_router_report_load(r, "b", 0, &none), KVROUTE_RESULT_OK);
  kvroute_load_report bad = {-1, -1, 1.5, NULL, 0};
  CHECK_RC(kvroute_router_report_load(r, "a", 0, &bad), KVROUTE_RESULT_INVALID_INPUT);
  kvroute_load_report huge = {(int64_t)1 << 40, -1, NAN, NULL, 0};
  CHECK_RC(kvroute_router_report_load(r, "a", 0, &huge), KVROUTE_RESULT_INVALID_INPUT);
  const char *bad_loras[] = {"ok", NULL};
  kvroute_load_report nul = {-1, -1, NAN, bad_loras, 2};
  CHECK_RC(kvroute_router_report_load(r, "a", 0, &nul), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_report_load(r, "zzz", 0, &rep), KVROUTE_RESULT_UNKNOWN_WORKER);
  CHECK_RC(kvroute_router_report_load(r, "a", 0, NULL), KVROUTE_RESULT_NULL_POINTER);
  /* The same with the scrape's time: same checks, same result codes. */
  CHECK_RC(kvroute_router_report_load_at(r, "a", 0, &rep, 1000), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_report_load_at(r, "b", 0, &none, 1050), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_report_load_at(r, "a", 0, &bad, 1100), KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_report_load_at(r, "a", 0, &huge, 1100),
           KVROUTE_RESULT_INVALID_INPUT);
  CHECK_RC(kvroute_router_report_load_at(r, "a", 0, &nul, 1100), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_report_load_at(r, "zzz", 0, &rep, 1100),
           KVROUTE_RESULT_UNKNOWN_WORKER);
  CHECK_RC(kvroute_router_report_load_at(r, "a", 0, NULL, 1100), KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_report_load_at(NULL, "a", 0, &rep, 1100),
           KVROUTE_RESULT_NULL_POINTER);

  /* Removal: the worker's cache entries go with it. */
  CHECK_RC(kvroute_router_remove_worker(r, first.worker, 0), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &second, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(second.worker, other) == 0 && second.matched_blocks == 0);
  kvroute_router_free(r);
}

/* ----- threads ---------------------------------------------------------------------- */

#define THREADS 4
#define ROUTES_PER_THREAD 200

typedef struct {
  kvroute_router *r;
  int id;
  int failures;
  int matched_full;
} thread_arg;

static void *route_thread(void *p) {
  thread_arg *a = p;
  uint32_t t[100];
  iota(t, 100);
  for (int i = 0; i < ROUTES_PER_THREAD; i++) {
    kvroute_decision_info info;
    kvroute_decision *d = NULL;
    const char *session = (i % 2) ? "client" : NULL;
    if (kvroute_router_route(a->r, t, 100, session, NULL, NULL, &info, &d) != KVROUTE_RESULT_OK) {
      a->failures++;
      continue;
    }
    if (info.matched_blocks > info.total_blocks || info.total_blocks != 6) a->failures++;
    if (info.matched_blocks == 6) a->matched_full++;
    if (kvroute_router_on_routed(a->r, d) != KVROUTE_RESULT_OK) a->failures++;
    if (kvroute_router_on_first_token(a->r, info.request_id) != KVROUTE_RESULT_OK) a->failures++;
    if (kvroute_router_on_finished(a->r, info.request_id) != KVROUTE_RESULT_OK) a->failures++;
    kvroute_decision_free(d);
    /* Errors on this thread do not leak into other threads' last-error slots. (Request ids
     * count up from 0, so the unknown id must be one no route of this test can get: id 0
     * is a live request for a moment on whichever thread routed first.) */
    if (kvroute_router_on_finished(a->r, UINT64_MAX) != KVROUTE_RESULT_INVALID_INPUT)
      a->failures++;
    char msg[256];
    size_t len = 0;
    if (kvroute_last_error_message(msg, sizeof msg, &len) != KVROUTE_RESULT_OK ||
        strstr(msg, "unknown request id 18446744073709551615") == NULL)
      a->failures++;
  }
  return NULL;
}

static void test_threads(void) {
  kvroute_router *r = new_router("{\"hash_algo\": \"sha256\", \"profile\": \"prefix\", "
                                 "\"workers\": [{\"name\": \"pod-a\"}, {\"name\": \"pod-b\"}]}");
  pthread_t th[THREADS];
  thread_arg args[THREADS];
  for (int i = 0; i < THREADS; i++) {
    args[i] = (thread_arg){r, i, 0, 0};
    CHECK(pthread_create(&th[i], NULL, route_thread, &args[i]) == 0);
  }
  /* Meanwhile, apply the recorded batches repeatedly and churn a third worker. */
  for (int round = 0; round < 5; round++) {
    for (size_t i = 0; i < g_nbatches; i++) {
      CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", g_batches[i].bytes, g_batches[i].len,
                                               NULL),
               KVROUTE_RESULT_OK);
    }
    CHECK_RC(kvroute_router_add_worker(r, "pod-c", 0), KVROUTE_RESULT_OK);
    CHECK_RC(kvroute_router_remove_worker(r, "pod-c", 0), KVROUTE_RESULT_OK);
  }
  /* End with r1 applied so the index is in a known state. */
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", g_batches[2].bytes, g_batches[2].len,
                                           NULL),
           KVROUTE_RESULT_OK); /* reset_prefix_cache */
  CHECK_RC(kvroute_router_apply_vllm_batch(r, "pod-a", g_batches[0].bytes, g_batches[0].len,
                                           NULL),
           KVROUTE_RESULT_OK);
  for (int i = 0; i < THREADS; i++) {
    CHECK(pthread_join(th[i], NULL) == 0);
    CHECK(args[i].failures == 0);
  }
  char *json = NULL;
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  CHECK(json && json_number(json, "routes") == THREADS * ROUTES_PER_THREAD);
  CHECK(json && json_number(json, "inflight_requests") == 0);
  kvroute_string_free(json);
  CHECK(holder_blocks(r) == 6);
  kvroute_router_free(r);
}


/* ----- explicit time, stream positions, result codes ------------------------------------ */

/* The "session" score of the chosen candidate of a decision. */
static double chosen_session_score(const kvroute_decision *d, const kvroute_decision_info *info) {
  for (size_t i = 0; i < info->num_candidates; i++) {
    kvroute_candidate c;
    if (kvroute_decision_candidate(d, i, &c) != KVROUTE_RESULT_OK) return NAN;
    if (strcmp(c.worker, info->worker) != 0 || c.dp_rank != info->dp_rank) continue;
    for (size_t j = 0; j < c.num_scores; j++) {
      const char *name = NULL;
      double v = NAN;
      if (kvroute_decision_score(d, i, j, &name, &v) != KVROUTE_RESULT_OK) return NAN;
      if (strcmp(name, "session") == 0) return v;
    }
  }
  return NAN;
}

static void route_at(kvroute_router *r, const char *session, uint64_t now_ms, char *worker_out,
                     double *session_score) {
  uint32_t t[32];
  iota(t, 32);
  kvroute_decision_info info;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route_at(r, t, 32, session, NULL, NULL, now_ms, &info, &d),
           KVROUTE_RESULT_OK);
  if (d == NULL) return;
  strcpy(worker_out, info.worker);
  *session_score = chosen_session_score(d, &info);
  CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_on_finished(r, info.request_id), KVROUTE_RESULT_OK);
  kvroute_decision_free(d);
}

static void test_route_at_session_ttl(void) {
  /* A 1 s session TTL, on the caller's clock: no sleeping. */
  kvroute_router *r = new_router("{\"profile\": \"session-affinity\", \"session_ttl_s\": 1, "
                                 "\"workers\": [{\"name\": \"pod-a\"}, {\"name\": \"pod-b\"}, "
                                 "{\"name\": \"pod-c\"}]}");
  char first[256] = "", again[256] = "", later[256] = "";
  double s0 = NAN, s1 = NAN, s2 = NAN;
  route_at(r, "10.0.0.1", 1000000, first, &s0);
  CHECK(s0 == 0.0); /* a new session */
  route_at(r, "10.0.0.1", 1000900, again, &s1);
  CHECK(s1 == 1.0 && strcmp(again, first) == 0); /* 0.9 s later: sticky */
  route_at(r, "10.0.0.1", 1001950, later, &s2);
  CHECK(s2 == 0.0); /* 1.05 s after the last route: expired */
  /* The same calls without an explicit time use the wall clock: the session recorded at
   * t = 1,000,900 ms (1970) is long expired there. */
  uint32_t t[32];
  iota(t, 32);
  kvroute_decision_info info;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route(r, t, 32, "10.0.0.2", NULL, NULL, &info, &d), KVROUTE_RESULT_OK);
  CHECK(chosen_session_score(d, &info) == 0.0);
  kvroute_decision_free(d);
  CHECK_RC(kvroute_router_route_at(NULL, t, 32, NULL, NULL, NULL, 0, &info, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  CHECK_RC(kvroute_router_route_at(r, t, 32, NULL, NULL, NULL, 0, NULL, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  kvroute_router_free(r);
}

static void test_restore_positions(void) {
  const char *cfg = "{\"hash_algo\": \"sha256\", \"profile\": \"prefix\", \"workers\": "
                    "[{\"name\": \"pod-a\"}, {\"name\": \"pod-b\"}]}";
  kvroute_router *r = new_router(cfg);
  const batch *b0 = &g_batches[0];
  CHECK_RC(kvroute_router_apply_vllm_batch_from(r, "pod-a", b0->bytes, b0->len,
                                                "tcp://10.0.0.1:5557", 41, NULL),
           KVROUTE_RESULT_OK);
  /* A rejected batch still moves its stream's position. */
  const uint8_t junk[] = {0x93, 0xff};
  CHECK_RC(kvroute_router_apply_vllm_batch_from(r, "pod-b", junk, sizeof junk,
                                                "tcp://10.0.0.2:5557", 7, NULL),
           KVROUTE_RESULT_DECODE);
  CHECK_RC(kvroute_router_apply_vllm_batch_from(r, "pod-a", b0->bytes, b0->len, NULL, 1, NULL),
           KVROUTE_RESULT_NULL_POINTER);
  uint8_t *snap = NULL;
  size_t snap_len = 0;
  CHECK_RC(kvroute_router_snapshot(r, &snap, &snap_len), KVROUTE_RESULT_OK);

  kvroute_router *r2 = new_router(cfg);
  char *json = NULL;
  CHECK_RC(kvroute_router_restore_positions(r2, snap, snap_len, &json), KVROUTE_RESULT_OK);
  CHECK(json != NULL && strcmp(json, "{\"tcp://10.0.0.1:5557\":41,\"tcp://10.0.0.2:5557\":7}") == 0);
  if (json) printf("restored positions: %s\n", json);
  kvroute_string_free(json);
  CHECK(holder_blocks(r2) == 6);
  /* Errors write nothing and change nothing. */
  json = NULL;
  snap[snap_len / 2] ^= 0x5a;
  kvroute_result rc = kvroute_router_restore_positions(r2, snap, snap_len, &json);
  CHECK(rc == KVROUTE_RESULT_SNAPSHOT || rc == KVROUTE_RESULT_OK);
  if (rc != KVROUTE_RESULT_OK) CHECK(json == NULL);
  kvroute_string_free(json);
  json = NULL;
  CHECK_RC(kvroute_router_restore_positions(r2, snap, 3, &json), KVROUTE_RESULT_SNAPSHOT);
  CHECK(json == NULL);
  CHECK_RC(kvroute_router_restore_positions(r2, snap, snap_len, NULL), KVROUTE_RESULT_NULL_POINTER);
  /* A snapshot without positions gives an empty object. */
  kvroute_router *empty = new_router(cfg);
  uint8_t *snap2 = NULL;
  size_t snap2_len = 0;
  CHECK_RC(kvroute_router_snapshot(empty, &snap2, &snap2_len), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_restore_positions(r2, snap2, snap2_len, &json), KVROUTE_RESULT_OK);
  CHECK(json != NULL && strcmp(json, "{}") == 0);
  kvroute_string_free(json);
  kvroute_bytes_free(snap, snap_len);
  kvroute_bytes_free(snap2, snap2_len);
  kvroute_router_free(empty);
  kvroute_router_free(r2);
  kvroute_router_free(r);
}

/* Every result code the API can return, produced through the API; the codes it cannot
 * return (documented in the header) are listed, so a new code must be added to one of the
 * two lists. */
static void test_every_result_code(void) {
  int seen[128] = {0};
#define EXPECT(expr, want)           \
  do {                               \
    kvroute_result rc2_ = (expr);    \
    CHECK_RC(rc2_, want);            \
    if (rc2_ == (want)) seen[want] = 1; \
  } while (0)
  kvroute_router *r = NULL;
  const batch *b0 = &g_batches[0];
  uint32_t t[32];
  iota(t, 32);
  kvroute_decision_info info;
  char buf[4];
  size_t len = 0;
  EXPECT(kvroute_router_new("{\"workers\": [{\"name\": \"a\"}]}", &r), KVROUTE_RESULT_OK);
  EXPECT(kvroute_router_new("{\"block_size\": 0}", &(kvroute_router *){NULL}), KVROUTE_RESULT_CONFIG);
  EXPECT(kvroute_router_route(r, t, 32, "\xff", NULL, NULL, &info, NULL), KVROUTE_RESULT_INVALID_UTF8);
  EXPECT(kvroute_router_route(r, NULL, 32, NULL, NULL, NULL, &info, NULL), KVROUTE_RESULT_NULL_POINTER);
  EXPECT(kvroute_router_add_worker(r, "", 0), KVROUTE_RESULT_INVALID_INPUT);
  EXPECT(kvroute_router_remove_worker(r, "nobody", 0), KVROUTE_RESULT_UNKNOWN_WORKER);
  EXPECT(kvroute_router_add_worker(r, "a", 0), KVROUTE_RESULT_WORKER_EXISTS);
  EXPECT(kvroute_router_apply_vllm_batch(r, "a", b0->bytes, b0->len - 1, NULL), KVROUTE_RESULT_DECODE);
  EXPECT(kvroute_router_restore(r, (const uint8_t *)"junk", 4), KVROUTE_RESULT_SNAPSHOT);
  kvroute_router_free(r);
  EXPECT(kvroute_router_new("{\"hash_algo\": \"xxhash\"}", &r), KVROUTE_RESULT_MISSING_SEED);
  r = new_router("{\"block_size\": 32, \"workers\": [{\"name\": \"a\"}]}");
  EXPECT(kvroute_router_apply_vllm_batch(r, "a", b0->bytes, b0->len, NULL),
         KVROUTE_RESULT_BLOCK_SIZE_MISMATCH);
  kvroute_router_free(r);
  r = new_router("{\"hash_algo\": \"sha256\", \"hash_seed\": \"0\", \"workers\": [{\"name\": \"a\"}]}");
  EXPECT(kvroute_router_apply_vllm_batch(r, "a", b0->bytes, b0->len, NULL),
         KVROUTE_RESULT_HASH_MISMATCH);
  kvroute_router_free(r);
  r = new_router("{}");
  EXPECT(kvroute_router_route(r, t, 32, NULL, NULL, NULL, &info, NULL), KVROUTE_RESULT_NO_WORKERS);
  kvroute_router_free(r);
  EXPECT(kvroute_router_new("{\"profil\": 1}", &(kvroute_router *){NULL}), KVROUTE_RESULT_CONFIG);
  EXPECT(kvroute_last_error_message(buf, sizeof buf, &len), KVROUTE_RESULT_BUFFER_TOO_SMALL);
#undef EXPECT
  const kvroute_result reachable[] = {
      KVROUTE_RESULT_OK,           KVROUTE_RESULT_CONFIG,        KVROUTE_RESULT_INVALID_INPUT,
      KVROUTE_RESULT_UNKNOWN_WORKER, KVROUTE_RESULT_WORKER_EXISTS,
      KVROUTE_RESULT_BLOCK_SIZE_MISMATCH, KVROUTE_RESULT_DECODE, KVROUTE_RESULT_MISSING_SEED,
      KVROUTE_RESULT_SNAPSHOT,     KVROUTE_RESULT_HASH_MISMATCH, KVROUTE_RESULT_NO_WORKERS,
      KVROUTE_RESULT_NULL_POINTER, KVROUTE_RESULT_INVALID_UTF8,  KVROUTE_RESULT_BUFFER_TOO_SMALL,
  };
  /* Not returned by the API: the stream and I/O codes (shared numbering with the core) and
   * the two that only a bug produces (tested in Rust: crates/ffi/src/boundary.rs). */
  const kvroute_result unreachable[] = {KVROUTE_RESULT_SEQUENCE_GAP, KVROUTE_RESULT_IO,
                                        KVROUTE_RESULT_INTERNAL, KVROUTE_RESULT_PANIC};
  size_t covered = 0;
  for (size_t i = 0; i < sizeof reachable / sizeof reachable[0]; i++) {
    CHECK(seen[reachable[i]]);
    covered++;
  }
  for (size_t i = 0; i < sizeof unreachable / sizeof unreachable[0]; i++) {
    CHECK(strcmp(kvroute_result_str(unreachable[i]), "unknown result code") != 0);
    covered++;
  }
  /* Every code that has a description is in one of the two lists. */
  size_t described = 0;
  for (uint32_t c = 0; c < 128; c++) {
    described += strcmp(kvroute_result_str((kvroute_result)c), "unknown result code") != 0;
  }
  CHECK(described == covered);
}

/* The default profile is the kvroute preset (explained in seconds); a routed request's
 * blocks are predicted on its worker, and the prediction counters and learned prefill
 * rates are in the metrics. */
static void test_kvroute_preset_and_predictions(void) {
  kvroute_router *r = new_router("{\"workers\": [{\"name\": \"a\"}, {\"name\": \"b\"}]}");
  kvroute_router *named = new_router("{\"profile\": \"kvroute\"}");
  kvroute_router_free(named);
  uint32_t t[160];
  iota(t, 160);
  kvroute_decision_info info, again;
  kvroute_decision *d = NULL;
  CHECK_RC(kvroute_router_route(r, t, 160, NULL, NULL, NULL, &info, &d), KVROUTE_RESULT_OK);
  const char *name = NULL;
  double v = NAN;
  CHECK_RC(kvroute_decision_score(d, 0, 0, &name, &v), KVROUTE_RESULT_OK);
  CHECK(name && strcmp(name, "ttft_s") == 0 && v > 0.0);
  CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_OK);
  CHECK_RC(kvroute_router_route(r, t, 160, NULL, NULL, NULL, &again, NULL), KVROUTE_RESULT_OK);
  CHECK(strcmp(again.worker, info.worker) == 0 && again.matched_blocks == 10);
  char *json = NULL, *prom = NULL;
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  CHECK(json && json_number(json, "made") == 10 && json_number(json, "predictions_held") == 10);
  CHECK(json && strstr(json, "\"prefill_tokens_per_s\":10000") != NULL);
  kvroute_string_free(json);
  CHECK_RC(kvroute_router_prometheus(r, &prom), KVROUTE_RESULT_OK);
  CHECK(prom && strstr(prom, "kvroute_predictions_made_total 10\n"));
  CHECK(prom && strstr(prom, "kvroute_worker_prefill_tokens_per_second{worker=\"a\""));
  kvroute_string_free(prom);
  kvroute_decision_free(d);
  kvroute_router_free(r);
}

static void test_ttft_tail_metric(void) {
  /* 64 requests whose first token comes at least 2 ms (wall clock) after routing: the
   * router's TTFT tail (p99 of what it observed) is exported, in seconds. */
  kvroute_router *r = new_router("{\"workers\": [{\"name\": \"a\"}, {\"name\": \"b\"}]}");
  char *json = NULL;
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  CHECK(json && json_double(json, "tail_ttft_s") == 0.0); /* nothing observed yet */
  kvroute_string_free(json);
  uint32_t t[64];
  for (uint32_t i = 0; i < 64; i++) {
    for (uint32_t j = 0; j < 64; j++) t[j] = 1000 + 64 * i + j;
    kvroute_decision_info info;
    kvroute_decision *d = NULL;
    CHECK_RC(kvroute_router_route(r, t, 64, NULL, NULL, NULL, &info, &d), KVROUTE_RESULT_OK);
    CHECK_RC(kvroute_router_on_routed(r, d), KVROUTE_RESULT_OK);
    struct timespec ts = {0, 2 * 1000 * 1000};
    nanosleep(&ts, NULL);
    CHECK_RC(kvroute_router_on_first_token(r, info.request_id), KVROUTE_RESULT_OK);
    CHECK_RC(kvroute_router_on_finished(r, info.request_id), KVROUTE_RESULT_OK);
    kvroute_decision_free(d);
  }
  CHECK_RC(kvroute_router_metrics_json(r, &json), KVROUTE_RESULT_OK);
  double tail = json ? json_double(json, "tail_ttft_s") : NAN;
  CHECK(tail >= 0.001 && tail < 10.0);
  kvroute_string_free(json);
  char *prom = NULL;
  CHECK_RC(kvroute_router_prometheus(r, &prom), KVROUTE_RESULT_OK);
  CHECK(prom && strstr(prom, "kvroute_ttft_tail_seconds "));
  kvroute_string_free(prom);
  kvroute_router_free(r);
}

int main(int argc, char **argv) {
  if (argc != 2 || load_vectors(argv[1]) != 0) {
    fprintf(stderr, "usage: %s VECTORS_FILE (from extract_vectors.py)\n", argv[0]);
    return 2;
  }
  test_version_and_result_strings();
  test_config_errors();
  test_route_and_candidates();
  test_long_worker_name();
  test_events();
  test_workers_and_load();
  test_threads();
  test_route_at_session_ttl();
  test_restore_positions();
  test_every_result_code();
  test_kvroute_preset_and_predictions();
  test_ttft_tail_metric();
  free_vectors();
  printf("%d passed, %d failed\n", g_checks - g_failures, g_failures);
  return g_failures == 0 ? 0 : 1;
}
