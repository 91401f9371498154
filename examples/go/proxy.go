// Command proxy is a minimal KV-cache-aware reverse proxy for OpenAI-style completion
// requests: each request goes to the backend most likely to hold its prompt prefix.
//
// The router runs in approximate mode with the "kvroute" profile (the default preset: the
// lowest predicted time to first token): no KV events are needed, the router models each
// backend's cache from the requests it sent there.
//
// Token ids: a body whose "prompt" is an array of integers is routed by those token ids.
// A string prompt is routed by a tokenizer-free stand-in: its UTF-8 bytes as token ids.
// That keeps prefixes aligned (a shared text prefix is a shared byte prefix) but makes
// blocks 16 bytes rather than 16 tokens, and such keys can never match the KV events vLLM
// publishes. For precise mode pass the model's real token ids (tokenized as vLLM does), or
// run `kvroute serve` (docs/serve.md), which tokenizes exactly as vLLM does and is the
// production front end; this example shows the C ABI from Go.
//
// Usage:
//
//	proxy -listen 127.0.0.1:8080 -backends 127.0.0.1:8001,127.0.0.1:8002
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"strings"

	"kvroute.dev/kvroute"
)

// Proxy routes requests across backends with a kvroute router.
type Proxy struct {
	router   *kvroute.Router
	backends map[string]*url.URL // by worker name (the backend's host:port)
	rp       *httputil.ReverseProxy
}

type ctxKey struct{}

type routed struct {
	target   *url.URL
	decision *kvroute.Decision
}

// NewProxy builds a proxy over backends (base URLs); the router's worker names are the
// backends' host:port.
func NewProxy(backends []string) (*Proxy, error) {
	p := &Proxy{backends: map[string]*url.URL{}}
	type worker struct {
		Name string `json:"name"`
	}
	cfg := struct {
		Mode    string   `json:"mode"`
		Profile string   `json:"profile"`
		Workers []worker `json:"workers"`
	}{Mode: "approximate", Profile: "kvroute"}
	for _, b := range backends {
		u, err := url.Parse(b)
		if err != nil || u.Host == "" {
			return nil, fmt.Errorf("bad backend URL %q", b)
		}
		p.backends[u.Host] = u
		cfg.Workers = append(cfg.Workers, worker{Name: u.Host})
	}
	js, _ := json.Marshal(cfg)
	r, err := kvroute.New(string(js))
	if err != nil {
		return nil, err
	}
	p.router = r
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			rt := pr.In.Context().Value(ctxKey{}).(*routed)
			pr.SetURL(rt.target)
			pr.SetXForwarded()
		},
		ModifyResponse: func(resp *http.Response) error {
			// Response headers are back: the backend finished prefill (for streaming
			// responses this is the first token).
			rt := resp.Request.Context().Value(ctxKey{}).(*routed)
			resp.Header.Set("X-Kvroute-Worker", rt.decision.Worker)
			return r.OnFirstToken(rt.decision.RequestID)
		},
	}
	return p, nil
}

// Close frees the router.
func (p *Proxy) Close() error { return p.router.Close() }

// Router is the proxy's router (for metrics).
func (p *Proxy) Router() *kvroute.Router { return p.router }

// promptTokens extracts the routing tokens from an OpenAI-style body.
func promptTokens(body []byte) ([]uint32, error) {
	var req struct {
		Prompt json.RawMessage `json:"prompt"`
	}
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, fmt.Errorf("body is not JSON: %w", err)
	}
	var ids []uint32
	if err := json.Unmarshal(req.Prompt, &ids); err == nil {
		return ids, nil
	}
	var text string
	if err := json.Unmarshal(req.Prompt, &text); err != nil {
		return nil, errors.New(`"prompt" must be a string or an array of token ids`)
	}
	ids = make([]uint32, len(text))
	for i := 0; i < len(text); i++ {
		ids[i] = uint32(text[i])
	}
	return ids, nil
}

func (p *Proxy) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	body, err := io.ReadAll(io.LimitReader(req.Body, 64<<20))
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	tokens, err := promptTokens(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	d, err := p.router.Route(tokens, kvroute.RouteOptions{Session: req.Header.Get("X-Session-Id")})
	if err != nil {
		status := http.StatusInternalServerError
		if errors.Is(err, kvroute.ErrNoWorkers) {
			status = http.StatusServiceUnavailable
		} else if errors.Is(err, kvroute.ErrInvalidInput) {
			status = http.StatusBadRequest
		}
		http.Error(w, err.Error(), status)
		return
	}
	target := p.backends[d.Worker]
	if err := p.router.OnRouted(d); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	defer func() {
		if err := p.router.OnFinished(d.RequestID); err != nil {
			log.Printf("on_finished: %v", err)
		}
	}()
	req.Body = io.NopCloser(bytes.NewReader(body))
	req.ContentLength = int64(len(body))
	ctx := context.WithValue(req.Context(), ctxKey{}, &routed{target: target, decision: d})
	p.rp.ServeHTTP(w, req.WithContext(ctx))
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8080", "address to listen on")
	backends := flag.String("backends", "", "comma-separated backend base URLs or host:port")
	flag.Parse()
	var urls []string
	for _, b := range strings.Split(*backends, ",") {
		if b = strings.TrimSpace(b); b == "" {
			continue
		}
		if !strings.Contains(b, "://") {
			b = "http://" + b
		}
		urls = append(urls, b)
	}
	if len(urls) == 0 {
		log.Fatal("no -backends given")
	}
	p, err := NewProxy(urls)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, _ *http.Request) {
		text, err := p.router.Prometheus()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		io.WriteString(w, text)
	})
	mux.Handle("/", p)
	log.Printf("kvroute %s proxy on %s -> %v", kvroute.Version(), *listen, urls)
	log.Fatal(http.ListenAndServe(*listen, mux))
}
