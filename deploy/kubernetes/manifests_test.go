// Package kubernetes checks the manifests in this directory: every document decodes
// strictly (unknown or duplicate fields fail) into the Kubernetes API types, and the
// flags, ports, names and settings agree with each other, with `kvroute serve --help` and
// with `kvroute emulate --help`.
//
// Run with: KVROUTE_BIN=/path/to/kvroute go test ./... (scripts/k8s_manifests_test.sh).
package kubernetes

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

type manifests struct {
	deployments map[string]*appsv1.Deployment // by file:name
	services    map[string]*corev1.Service
	configMaps  map[string]*corev1.ConfigMap
	monitors    map[string]*monitoringv1.ServiceMonitor
}

// decodeStrict decodes one YAML document into out, failing on unknown or duplicate fields.
func decodeStrict(doc []byte, out interface{}) error {
	return yaml.UnmarshalStrict(doc, out)
}

func load(t *testing.T) *manifests {
	t.Helper()
	m := &manifests{
		deployments: map[string]*appsv1.Deployment{},
		services:    map[string]*corev1.Service{},
		configMaps:  map[string]*corev1.ConfigMap{},
		monitors:    map[string]*monitoringv1.ServiceMonitor{},
	}
	files, err := filepath.Glob("*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	more, _ := filepath.Glob("emulated/*.yaml")
	files = append(files, more...)
	if len(files) < 4 {
		t.Fatalf("expected the manifests here, found %v", files)
	}
	sep := regexp.MustCompile(`(?m)^---\s*$`)
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for i, doc := range sep.Split(string(raw), -1) {
			if strings.TrimSpace(stripComments(doc)) == "" {
				continue
			}
			var tm metav1.TypeMeta
			if err := yaml.Unmarshal([]byte(doc), &tm); err != nil {
				t.Fatalf("%s doc %d: %v", f, i, err)
			}
			where := fmt.Sprintf("%s doc %d (%s %s)", f, i, tm.APIVersion, tm.Kind)
			var name string
			switch tm.APIVersion + "/" + tm.Kind {
			case "apps/v1/Deployment":
				var d appsv1.Deployment
				must(t, where, decodeStrict([]byte(doc), &d))
				name = d.Name
				m.deployments[f+":"+name] = &d
			case "v1/Service":
				var s corev1.Service
				must(t, where, decodeStrict([]byte(doc), &s))
				name = s.Name
				m.services[name] = &s
			case "v1/ConfigMap":
				var c corev1.ConfigMap
				must(t, where, decodeStrict([]byte(doc), &c))
				name = c.Name
				m.configMaps[name] = &c
			case "monitoring.coreos.com/v1/ServiceMonitor":
				var s monitoringv1.ServiceMonitor
				must(t, where, decodeStrict([]byte(doc), &s))
				name = s.Name
				m.monitors[name] = &s
			default:
				t.Fatalf("%s: no check for this kind; add one", where)
			}
			if name == "" {
				t.Fatalf("%s: no metadata.name", where)
			}
		}
	}
	return m
}

func stripComments(doc string) string {
	var b strings.Builder
	for _, l := range strings.Split(doc, "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "#") {
			b.WriteString(l + "\n")
		}
	}
	return b.String()
}

func must(t *testing.T, where string, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("%s: %v", where, err)
	}
}

func TestStrictDecodingRejectsUnknownFields(t *testing.T) {
	// The check itself: a misspelled field must fail, or the test proves nothing.
	bad := "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: x\nspec:\n  replica: 2\n"
	if err := decodeStrict([]byte(bad), &appsv1.Deployment{}); err == nil {
		t.Fatal("strict decoding accepted spec.replica")
	}
	dup := "apiVersion: v1\nkind: Service\nmetadata:\n  name: x\n  name: y\n"
	if err := decodeStrict([]byte(dup), &corev1.Service{}); err == nil {
		t.Fatal("strict decoding accepted a duplicate field")
	}
}

// kvrouteBin is the kvroute binary whose --help the manifests are checked against.
func kvrouteBin(t *testing.T) string {
	t.Helper()
	if p := os.Getenv("KVROUTE_BIN"); p != "" {
		return p
	}
	for _, p := range []string{"../../target/release/kvroute", "../../target/debug/kvroute"} {
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	t.Fatal("no kvroute binary: build it (cargo build -p kvroute-cli) or set KVROUTE_BIN")
	return ""
}

var flagRe = regexp.MustCompile(`(?m)^\s+(?:-\w, )?(--[a-z][a-z0-9-]*)`)

// helpFlags runs `kvroute <sub> --help` and returns the long flags it documents.
func helpFlags(t *testing.T, sub string) map[string]bool {
	t.Helper()
	out, err := exec.Command(kvrouteBin(t), sub, "--help").CombinedOutput()
	if err != nil {
		t.Fatalf("kvroute %s --help: %v\n%s", sub, err, out)
	}
	flags := map[string]bool{}
	for _, m := range flagRe.FindAllStringSubmatch(string(out), -1) {
		flags[m[1]] = true
	}
	if len(flags) < 3 {
		t.Fatalf("kvroute %s --help lists no flags:\n%s", sub, out)
	}
	return flags
}

// argMap turns ["sub", "--a=b", "--c", "d"] into {"--a": "b", "--c": "d"}.
func argMap(t *testing.T, where string, args []string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			continue
		}
		if k, v, ok := strings.Cut(a, "="); ok {
			m[k] = v
		} else if i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
			m[a] = args[i+1]
			i++
		} else {
			m[a] = ""
		}
	}
	return m
}

func portOf(t *testing.T, where, addr string) int32 {
	t.Helper()
	addr = strings.TrimPrefix(strings.TrimPrefix(addr, "tcp://"), "http://")
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("%s: %q: %v", where, addr, err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatalf("%s: %q: %v", where, addr, err)
	}
	return int32(n)
}

func containerPort(t *testing.T, c *corev1.Container, name string) int32 {
	t.Helper()
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort
		}
	}
	t.Fatalf("container %s has no port named %q", c.Name, name)
	return 0
}

func (m *manifests) deployment(t *testing.T, file, name string) *appsv1.Deployment {
	t.Helper()
	d, ok := m.deployments[file+":"+name]
	if !ok {
		t.Fatalf("no Deployment %s in %s", name, file)
	}
	if len(d.Spec.Template.Spec.Containers) != 1 {
		t.Fatalf("Deployment %s: expected one container", name)
	}
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		t.Fatalf("Deployment %s: selector does not match its pod labels (%v)", name, err)
	}
	return d
}

// seedRef checks that the container takes PYTHONHASHSEED from the shared ConfigMap and
// returns that value.
func (m *manifests) seedRef(t *testing.T, c *corev1.Container) string {
	t.Helper()
	for _, e := range c.Env {
		if e.Name != "PYTHONHASHSEED" {
			continue
		}
		if e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil {
			t.Fatalf("%s: PYTHONHASHSEED must come from a ConfigMap shared with the router", c.Name)
		}
		ref := e.ValueFrom.ConfigMapKeyRef
		cm, ok := m.configMaps[ref.Name]
		if !ok {
			t.Fatalf("%s: ConfigMap %s not in the manifests", c.Name, ref.Name)
		}
		v, ok := cm.Data[ref.Key]
		if !ok {
			t.Fatalf("%s: ConfigMap %s has no key %s", c.Name, ref.Name, ref.Key)
		}
		return ref.Name + "/" + ref.Key + "=" + v
	}
	t.Fatalf("%s: no PYTHONHASHSEED", c.Name)
	return ""
}

type kvEventsConfig struct {
	Enable         bool   `json:"enable_kv_cache_events"`
	Publisher      string `json:"publisher"`
	Endpoint       string `json:"endpoint"`
	ReplayEndpoint string `json:"replay_endpoint"`
	Topic          string `json:"topic"`
}

type serveConfig struct {
	Router map[string]json.RawMessage `json:"router"`
	Server struct {
		Listen string `json:"listen"`
		DNS    *struct {
			Name         string  `json:"name"`
			Port         int32   `json:"port"`
			KvEventsPort int32   `json:"kv_events_port"`
			ReplayPort   int32   `json:"replay_port"`
			IntervalS    float64 `json:"interval_s"`
		} `json:"dns"`
		Tokenizer string `json:"tokenizer"`
		Topic     string `json:"topic"`
	} `json:"server"`
}

func TestManifestsAgree(t *testing.T) {
	m := load(t)
	serveFlags := helpFlags(t, "serve")
	emulateFlags := helpFlags(t, "emulate")

	// vLLM: its own flags give the ports the Service and the router use.
	vllm := m.deployment(t, "vllm.yaml", "vllm")
	vc := &vllm.Spec.Template.Spec.Containers[0]
	va := argMap(t, "vllm", vc.Args)
	var kv kvEventsConfig
	dec := json.NewDecoder(strings.NewReader(va["--kv-events-config"]))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&kv); err != nil {
		t.Fatalf("vllm --kv-events-config: %v", err)
	}
	if !kv.Enable || kv.Publisher != "zmq" || kv.Topic == "" {
		t.Fatalf("vllm --kv-events-config must enable zmq events with a topic: %+v", kv)
	}
	httpPort := containerPort(t, vc, "http")
	if va["--port"] != strconv.Itoa(int(httpPort)) {
		t.Errorf("vllm --port %s != containerPort http %d", va["--port"], httpPort)
	}
	if portOf(t, "vllm endpoint", kv.Endpoint) != containerPort(t, vc, "kv-events") {
		t.Errorf("vllm kv-events endpoint %s != containerPort kv-events", kv.Endpoint)
	}
	if portOf(t, "vllm replay", kv.ReplayEndpoint) != containerPort(t, vc, "kv-replay") {
		t.Errorf("vllm replay endpoint %s != containerPort kv-replay", kv.ReplayEndpoint)
	}
	if !strings.HasPrefix(kv.Endpoint, "tcp://*:") || !strings.HasPrefix(kv.ReplayEndpoint, "tcp://*:") {
		t.Errorf("vLLM binds only wildcard endpoints (tcp://*:PORT); got %s and %s", kv.Endpoint, kv.ReplayEndpoint)
	}
	vllmSeed := m.seedRef(t, vc)

	// The headless Service in front of the vLLM pods.
	svc, ok := m.services["vllm"]
	if !ok || svc.Spec.ClusterIP != corev1.ClusterIPNone {
		t.Fatalf("the vllm Service must be headless (clusterIP: None)")
	}
	servicePort := map[string]int32{}
	for _, p := range svc.Spec.Ports {
		if p.TargetPort.StrVal == "" {
			t.Errorf("vllm Service port %s: use the container port's name as targetPort", p.Name)
		}
		if p.Port != containerPort(t, vc, p.TargetPort.StrVal) {
			t.Errorf("headless Service port %s (%d) must equal the pod's port: DNS gives pod IPs", p.Name, p.Port)
		}
		servicePort[p.Name] = p.Port
	}

	// kvroute serve: flags exist, config agrees with vLLM, ports and probes line up.
	kr := m.deployment(t, "kvroute.yaml", "kvroute")
	kc := &kr.Spec.Template.Spec.Containers[0]
	if len(kc.Args) == 0 || kc.Args[0] != "serve" {
		t.Fatalf("kvroute container args must start with serve: %v", kc.Args)
	}
	ka := argMap(t, "kvroute", kc.Args)
	for f := range ka {
		if !serveFlags[f] {
			t.Errorf("kvroute serve has no flag %s (kvroute serve --help)", f)
		}
	}
	cm := m.configMaps["kvroute-config"]
	if cm == nil {
		t.Fatal("no ConfigMap kvroute-config")
	}
	cfgPath := ka["--config"]
	var mounted bool
	for _, vm := range kc.VolumeMounts {
		if filepath.Join(vm.MountPath, filepath.Base(cfgPath)) == cfgPath {
			for _, v := range kr.Spec.Template.Spec.Volumes {
				if v.Name == vm.Name && v.ConfigMap != nil && v.ConfigMap.Name == cm.Name {
					mounted = true
				}
			}
		}
	}
	if !mounted {
		t.Errorf("--config %s is not the mounted ConfigMap %s", cfgPath, cm.Name)
	}
	var sc serveConfig
	dec = json.NewDecoder(bytes.NewReader([]byte(cm.Data[filepath.Base(cfgPath)])))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&sc); err != nil {
		t.Fatalf("kvroute config.json: %v", err)
	}
	listen := sc.Server.Listen
	if l, ok := ka["--listen"]; ok {
		listen = l
	}
	if portOf(t, "kvroute listen", listen) != containerPort(t, kc, "http") {
		t.Errorf("kvroute listens on %s, containerPort http is %d", listen, containerPort(t, kc, "http"))
	}
	if kc.ReadinessProbe == nil || kc.ReadinessProbe.HTTPGet == nil || kc.ReadinessProbe.HTTPGet.Path != "/ready" || kc.ReadinessProbe.HTTPGet.Port.StrVal != "http" {
		t.Errorf("kvroute readiness must be GET /ready on port http")
	}
	d := sc.Server.DNS
	if d == nil || d.Name != svc.Name {
		t.Fatalf("kvroute must resolve its backends from the headless Service %s: %+v", svc.Name, d)
	}
	if d.Port != servicePort["http"] || d.KvEventsPort != servicePort["kv-events"] || d.ReplayPort != servicePort["kv-replay"] {
		t.Errorf("kvroute dns ports %d/%d/%d != vLLM's %v", d.Port, d.KvEventsPort, d.ReplayPort, servicePort)
	}
	if sc.Server.Topic != kv.Topic {
		t.Errorf("kvroute topic %q != vLLM topic %q", sc.Server.Topic, kv.Topic)
	}
	var algo string
	_ = json.Unmarshal(sc.Router["hash_algo"], &algo)
	if algo != va["--prefix-caching-hash-algo"] {
		t.Errorf("kvroute hash_algo %q != vLLM --prefix-caching-hash-algo %q", algo, va["--prefix-caching-hash-algo"])
	}
	var bs int
	_ = json.Unmarshal(sc.Router["block_size"], &bs)
	if strconv.Itoa(bs) != va["--block-size"] {
		t.Errorf("kvroute block_size %d != vLLM --block-size %s", bs, va["--block-size"])
	}
	if ka["--hash-seed"] != "$(PYTHONHASHSEED)" || m.seedRef(t, kc) != vllmSeed {
		t.Errorf("kvroute must take --hash-seed from the same PYTHONHASHSEED as vLLM (%s)", vllmSeed)
	}
	ks := m.services["kvroute"]
	if ks == nil || len(ks.Spec.Ports) == 0 || ks.Spec.Ports[0].TargetPort.StrVal != "http" {
		t.Errorf("the kvroute Service must target the container port http")
	}
	if !labels.SelectorFromSet(ks.Spec.Selector).Matches(labels.Set(kr.Spec.Template.Labels)) {
		t.Errorf("the kvroute Service does not select the kvroute pods")
	}

	// The emulated stand-in: same name, labels, ports and settings, with flags kvroute
	// emulate has.
	em := m.deployment(t, "emulated/vllm-emulated.yaml", "vllm")
	ec := &em.Spec.Template.Spec.Containers[0]
	if len(ec.Args) == 0 || ec.Args[0] != "emulate" {
		t.Fatalf("emulated container args must start with emulate: %v", ec.Args)
	}
	ea := argMap(t, "emulate", ec.Args)
	for f := range ea {
		if !emulateFlags[f] {
			t.Errorf("kvroute emulate has no flag %s (kvroute emulate --help)", f)
		}
	}
	for flag, port := range map[string]string{"--listen": "http", "--kv-events": "kv-events", "--replay-endpoint": "kv-replay"} {
		if portOf(t, "emulate "+flag, ea[flag]) != containerPort(t, vc, port) || containerPort(t, ec, port) != containerPort(t, vc, port) {
			t.Errorf("emulate %s %s: must use vLLM's %s port %d", flag, ea[flag], port, containerPort(t, vc, port))
		}
	}
	if ea["--topic"] != kv.Topic || ea["--hash-algo"] != algo || m.seedRef(t, ec) != vllmSeed || ea["--hash-seed"] != "$(PYTHONHASHSEED)" {
		t.Errorf("the emulator's topic, hash algo and seed must be vLLM's")
	}
	if !labels.SelectorFromSet(svc.Spec.Selector).Matches(labels.Set(em.Spec.Template.Labels)) {
		t.Errorf("the headless Service does not select the emulated pods")
	}

	// The ServiceMonitor scrapes both Services on a port they have.
	if len(m.monitors) != 1 {
		t.Fatalf("expected one ServiceMonitor")
	}
	for _, mon := range m.monitors {
		sel, err := metav1.LabelSelectorAsSelector(&mon.Spec.Selector)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range []*corev1.Service{svc, ks} {
			if !sel.Matches(labels.Set(s.Labels)) {
				t.Errorf("ServiceMonitor %s does not select Service %s", mon.Name, s.Name)
			}
			for _, ep := range mon.Spec.Endpoints {
				found := false
				for _, p := range s.Spec.Ports {
					found = found || p.Name == ep.Port
				}
				if !found || ep.Path != "/metrics" {
					t.Errorf("ServiceMonitor endpoint %s%s not on Service %s", ep.Port, ep.Path, s.Name)
				}
			}
		}
	}
}

// TestServeAcceptsTheConfigMap starts `kvroute serve` on the ConfigMap's config.json (its
// tokenizer path pointed at the repository's test tokenizer): kvroute reads the file
// strictly, so an unknown or misspelled setting makes it exit at once.
func TestServeAcceptsTheConfigMap(t *testing.T) {
	m := load(t)
	cm := m.configMaps["kvroute-config"]
	if cm == nil {
		t.Fatal("no ConfigMap kvroute-config")
	}
	var cfg map[string]interface{}
	if err := json.Unmarshal([]byte(cm.Data["config.json"]), &cfg); err != nil {
		t.Fatal(err)
	}
	tok, err := filepath.Abs("../../testdata/tokenize/chatml")
	if err != nil {
		t.Fatal(err)
	}
	cfg["server"].(map[string]interface{})["tokenizer"] = tok
	b, _ := json.Marshal(cfg)
	path := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(kvrouteBin(t), "serve", "--config", path, "--listen", "127.0.0.1:0")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		t.Fatalf("kvroute serve exited on the ConfigMap's config (%v):\n%s", err, out.String())
	case <-time.After(1500 * time.Millisecond):
		_ = cmd.Process.Kill()
		<-done
	}
}
