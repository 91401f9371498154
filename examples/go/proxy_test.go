package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// stubBackends start loopback backends that answer with their own name and count the
// requests they saw.
func stubBackends(t *testing.T, n int) ([]string, map[string]*int, *sync.Mutex) {
	var mu sync.Mutex
	counts := map[string]*int{}
	var urls []string
	for i := 0; i < n; i++ {
		name := fmt.Sprint("backend-", i)
		c := new(int)
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, _ := io.ReadAll(r.Body)
			if !json.Valid(body) {
				http.Error(w, "body lost", http.StatusBadRequest)
				return
			}
			mu.Lock()
			*c++
			mu.Unlock()
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"backend": %q}`, name)
		}))
		t.Cleanup(srv.Close)
		counts[name] = c
		urls = append(urls, srv.URL)
	}
	return urls, counts, &mu
}

func post(t *testing.T, url, body string) (string, string) {
	t.Helper()
	resp, err := http.Post(url+"/v1/completions", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Backend string `json:"backend"`
	}
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || json.Unmarshal(raw, &out) != nil {
		t.Fatalf("status %d: %s", resp.StatusCode, raw)
	}
	return out.Backend, resp.Header.Get("X-Kvroute-Worker")
}

func TestSharedPrefixesLandTogether(t *testing.T) {
	urls, counts, mu := stubBackends(t, 3)
	p, err := NewProxy(urls)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	front := httptest.NewServer(p)
	defer front.Close()

	system := strings.Repeat("You are a careful assistant who answers in French. ", 8)
	docs := []string{
		strings.Repeat("Document A: the history of the Loire valley castles. ", 6),
		strings.Repeat("Document B: a guide to sourdough fermentation times. ", 6),
	}
	for d, doc := range docs {
		first := ""
		for q := 0; q < 5; q++ {
			prompt := system + doc + fmt.Sprintf("Question %d: summarise point %d.", q, q*7)
			body, _ := json.Marshal(map[string]any{"model": "m", "prompt": prompt, "max_tokens": 8})
			backend, worker := post(t, front.URL, string(body))
			if worker == "" {
				t.Fatal("no X-Kvroute-Worker header")
			}
			if q == 0 {
				first = backend
			} else if backend != first {
				t.Fatalf("doc %d question %d went to %s, earlier ones to %s", d, q, backend, first)
			}
		}
	}
	// Token-id prompts too.
	ids := make([]int, 200)
	for i := range ids {
		ids[i] = 7000 + i
	}
	first := ""
	for q := 0; q < 4; q++ {
		body, _ := json.Marshal(map[string]any{"prompt": append(append([]int{}, ids...), q, q+1)})
		backend, _ := post(t, front.URL, string(body))
		if q > 0 && backend != first {
			t.Fatalf("token prompt %d went to %s, earlier to %s", q, backend, first)
		}
		first = backend
	}
	mu.Lock()
	total := 0
	for _, c := range counts {
		total += *c
	}
	mu.Unlock()
	if total != 14 {
		t.Fatalf("backends saw %d requests, want 14", total)
	}
	// Every request was reported finished.
	m, err := p.Router().Metrics()
	if err != nil {
		t.Fatal(err)
	}
	if m.Routes != 14 || m.InflightRequests != 0 || m.PredictedHitTokens == 0 {
		t.Fatalf("metrics %+v", m)
	}
}

func TestBadRequests(t *testing.T) {
	urls, _, _ := stubBackends(t, 1)
	p, err := NewProxy(urls)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	front := httptest.NewServer(p)
	defer front.Close()
	for _, body := range []string{"not json", `{"prompt": {"x": 1}}`} {
		resp, err := http.Post(front.URL, "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("%q: status %d", body, resp.StatusCode)
		}
	}
	// With its only backend unhealthy the proxy answers 503.
	p.Router().SetHealthy(strings.TrimPrefix(urls[0], "http://"), 0, false)
	resp, err := http.Post(front.URL, "application/json", strings.NewReader(`{"prompt": "hi"}`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("status %d", resp.StatusCode)
	}
}
