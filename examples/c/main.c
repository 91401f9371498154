/*
 * A small kvroute program: a router in approximate mode (no KV events needed) with the
 * "kvroute" profile (the default preset) and three workers. Requests that share a prompt prefix go to the same
 * worker; the program prints each decision and the Prometheus metrics.
 */
#include "kvroute.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, kvroute_result rc) {
  char msg[512];
  size_t len = 0;
  kvroute_last_error_message(msg, sizeof msg, &len);
  fprintf(stderr, "%s: %s (%u): %s\n", what, kvroute_result_str(rc), (unsigned)rc, msg);
  return 1;
}

int main(void) {
  kvroute_router *router = NULL;
  kvroute_result rc = kvroute_router_new(
      "{\"mode\": \"approximate\", \"profile\": \"kvroute\", \"workers\": "
      "[{\"name\": \"10.0.0.1:8000\"}, {\"name\": \"10.0.0.2:8000\"}, {\"name\": \"10.0.0.3:8000\"}]}",
      &router);
  if (rc != KVROUTE_RESULT_OK) return fail("kvroute_router_new", rc);
  printf("kvroute %s\n", kvroute_version());

  /* Two "documents" of 64 tokens, each asked about three times with different suffixes. */
  char first_worker[2][KVROUTE_WORKER_NAME_CAPACITY] = {{0}};
  int together = 1;
  for (int i = 0; i < 6; i++) {
    uint32_t tokens[80];
    int doc = i % 2;
    for (int t = 0; t < 64; t++) tokens[t] = (uint32_t)(1000 * (doc + 1) + t);
    for (int t = 64; t < 80; t++) tokens[t] = (uint32_t)(50000 + 100 * i + t);

    kvroute_decision_info info;
    kvroute_decision *decision = NULL;
    rc = kvroute_router_route(router, tokens, 80, NULL, NULL, NULL, &info, &decision);
    if (rc != KVROUTE_RESULT_OK) return fail("kvroute_router_route", rc);
    printf("request %d (doc %d) -> %s, %u of %u blocks cached, %zu candidates\n", i, doc,
           info.worker, info.matched_blocks, info.total_blocks, info.num_candidates);
    if (i < 2) {
      snprintf(first_worker[doc], sizeof first_worker[doc], "%s", info.worker);
    } else if (strcmp(first_worker[doc], info.worker) != 0) {
      together = 0;
    }
    /* Tell the router the request was sent, and later that it finished. */
    rc = kvroute_router_on_routed(router, decision);
    if (rc != KVROUTE_RESULT_OK) return fail("kvroute_router_on_routed", rc);
    rc = kvroute_router_on_finished(router, info.request_id);
    if (rc != KVROUTE_RESULT_OK) return fail("kvroute_router_on_finished", rc);
    kvroute_decision_free(decision);
  }

  char *prom = NULL;
  rc = kvroute_router_prometheus(router, &prom);
  if (rc != KVROUTE_RESULT_OK) return fail("kvroute_router_prometheus", rc);
  fputs(prom, stdout);
  kvroute_string_free(prom);
  kvroute_router_free(router);
  if (!together) {
    fprintf(stderr, "requests sharing a prefix were split across workers\n");
    return 1;
  }
  printf("requests sharing a prefix stayed together\n");
  return 0;
}
