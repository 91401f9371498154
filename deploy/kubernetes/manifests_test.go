// Package kubernetes checks the manifests in this directory: every document decodes
// strictly (unknown or duplicate fields fail) into the Kubernetes API types, and the
// flags, ports, names and settings agree with each other, with `kvroute serve --help` and
// with `kvroute emulate --help`.
//
// It also runs the pods' and the router's arguments on this machine (per-pod KV-event
// topics reach the router) and checks the Dockerfile statically.
//
// Run with: KVROUTE_BIN=/path/to/kvroute go test ./... (deploy/kubernetes/run_manifest_tests.sh).
package kubernetes

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
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

// subscriptionAccepts says whether kvroute's subscriber with topic sub receives batches
// published on topic: kvroute-zmq subscribes with sub as the ZeroMQ prefix and then skips a
// topic frame that differs from a non-empty sub, so "" receives every topic and any other
// value only itself.
func subscriptionAccepts(sub, topic string) bool {
	return sub == "" || sub == topic
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$\$`)

// expandArgs expands $(VAR) in args as the kubelet does with the container's environment
// ($$ is a literal $); a reference to an undefined variable fails the test (the kubelet
// would leave it as is, which vLLM would then publish literally).
func expandArgs(t *testing.T, env map[string]string, args []string) []string {
	t.Helper()
	out := make([]string, len(args))
	for i, a := range args {
		out[i] = varRef.ReplaceAllStringFunc(a, func(ref string) string {
			if ref == "$$" {
				return "$"
			}
			name := ref[2 : len(ref)-1]
			v, ok := env[name]
			if !ok {
				t.Errorf("arg %q refers to $(%s), which the container does not define", a, name)
				return ref
			}
			return v
		})
	}
	return out
}

// podEnv is the container's environment on a pod with IP podIP: literal values, keys of
// the manifests' ConfigMaps and the downward API's status.podIP.
func (m *manifests) podEnv(t *testing.T, c *corev1.Container, podIP string) map[string]string {
	t.Helper()
	env := map[string]string{}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "status.podIP":
			env[e.Name] = podIP
		case e.ValueFrom.ConfigMapKeyRef != nil:
			ref := e.ValueFrom.ConfigMapKeyRef
			cm, ok := m.configMaps[ref.Name]
			if !ok {
				t.Fatalf("%s: env %s: ConfigMap %s not in the manifests", c.Name, e.Name, ref.Name)
			}
			env[e.Name] = cm.Data[ref.Key]
		default:
			t.Fatalf("%s: env %s: no check for this source; add one", c.Name, e.Name)
		}
	}
	return env
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
		Tokenizer string  `json:"tokenizer"`
		Topic     *string `json:"topic"`
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
	// A topic per pod, llm-d style: kv@<pod IP>:<port>@<served model>, with the pod IP
	// from the downward API. Expanded for two pods as the kubelet would, the topics must
	// differ and name each pod.
	podTopics := map[string]string{}
	for _, ip := range []string{"10.1.0.7", "10.1.3.12"} {
		expanded := expandArgs(t, m.podEnv(t, vc, ip), vc.Args)
		var pk kvEventsConfig
		if err := json.Unmarshal([]byte(argMap(t, "vllm", expanded)["--kv-events-config"]), &pk); err != nil {
			t.Fatalf("vllm --kv-events-config on pod %s: %v", ip, err)
		}
		want := fmt.Sprintf("kv@%s:%s@%s", ip, va["--port"], va["--served-model-name"])
		if pk.Topic != want {
			t.Errorf("vllm topic on pod %s is %q, want the per-pod topic %q", ip, pk.Topic, want)
		}
		podTopics[ip] = pk.Topic
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
	routerTopic := sc.Server.Topic
	if tf, ok := ka["--topic"]; ok {
		routerTopic = &tf
	}
	if routerTopic == nil {
		t.Errorf("kvroute config.json: set server.topic explicitly (\"\" for every pod's topic)")
	} else {
		for ip, topic := range podTopics {
			if !subscriptionAccepts(*routerTopic, topic) {
				t.Errorf("kvroute topic %q does not receive pod %s's topic %q", *routerTopic, ip, topic)
			}
		}
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
	for ip, topic := range podTopics {
		got := argMap(t, "emulate", expandArgs(t, m.podEnv(t, ec, ip), ec.Args))["--topic"]
		if got != topic {
			t.Errorf("the emulator's topic on pod %s is %q, vLLM's %q", ip, got, topic)
		}
	}
	if ea["--hash-algo"] != algo || m.seedRef(t, ec) != vllmSeed || ea["--hash-seed"] != "$(PYTHONHASHSEED)" {
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

// freeAddr returns 127.0.0.1:PORT with a port that was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// startProc starts the kvroute binary with args; it is killed when the test ends.
func startProc(t *testing.T, name string, args []string) *bytes.Buffer {
	t.Helper()
	cmd := exec.Command(kvrouteBin(t), args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, out.String())
		}
	})
	return &out
}

func waitHTTP(t *testing.T, url string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if r, err := http.Get(url); err == nil {
			r.Body.Close()
			if r.StatusCode == 200 {
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s did not answer 200", url)
}

var batchesRe = regexp.MustCompile(`(?m)^kvroute_serve_backend_event_batches_total\{backend="([^"]+)"\} (\d+)$`)

// routerBatches reads kvroute serve's event batches per backend from its /metrics.
func routerBatches(t *testing.T, addr string) map[string]int {
	t.Helper()
	r, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	body, _ := io.ReadAll(r.Body)
	got := map[string]int{}
	for _, m := range batchesRe.FindAllStringSubmatch(string(body), -1) {
		n, _ := strconv.Atoi(m[2])
		got[m[1]] = n
	}
	return got
}

// TestRouterReceivesEveryPodsTopic runs the manifests' processes on this machine: two
// emulated pods started with the emulated Deployment's args as the kubelet expands them
// (two pod IPs, so two topics), and kvroute serve on the ConfigMap's config with the
// Deployment's args. Only the addresses (the pods' own IPs and fixed ports cannot be bound
// here), the tokenizer path and DNS (replaced by the two backends) change. The router must
// receive the KV events of both pods. A second router subscribed to the first pod's topic
// only must receive that pod's events and none of the other's: the topics really differ on
// the wire, and the check can fail.
func TestRouterReceivesEveryPodsTopic(t *testing.T) {
	m := load(t)
	em := m.deployment(t, "emulated/vllm-emulated.yaml", "vllm")
	ec := &em.Spec.Template.Spec.Containers[0]
	tok, err := filepath.Abs("../../testdata/tokenize/chatml")
	if err != nil {
		t.Fatal(err)
	}
	type pod struct{ http, kv, replay, topic string }
	var pods []pod
	for _, ip := range []string{"10.1.0.7", "10.1.3.12"} {
		p := pod{http: freeAddr(t), kv: "tcp://" + freeAddr(t), replay: "tcp://" + freeAddr(t)}
		args := expandArgs(t, m.podEnv(t, ec, ip), ec.Args)
		for i, a := range args {
			k, _, _ := strings.Cut(a, "=")
			switch k {
			case "--listen":
				args[i] = k + "=" + p.http
			case "--kv-events":
				args[i] = k + "=" + p.kv
			case "--replay-endpoint":
				args[i] = k + "=" + p.replay
			case "--tokenizer":
				args[i] = k + "=" + tok
			case "--topic":
				_, p.topic, _ = strings.Cut(a, "=")
			}
		}
		if !strings.Contains(p.topic, ip) {
			t.Fatalf("the emulated pod's topic %q does not name its pod %s", p.topic, ip)
		}
		startProc(t, "emulated pod "+ip, args)
		pods = append(pods, p)
	}
	for _, p := range pods {
		waitHTTP(t, "http://"+p.http+"/health")
	}

	kr := m.deployment(t, "kvroute.yaml", "kvroute")
	kc := &kr.Spec.Template.Spec.Containers[0]
	var cfg map[string]interface{}
	if err := json.Unmarshal([]byte(m.configMaps["kvroute-config"].Data["config.json"]), &cfg); err != nil {
		t.Fatal(err)
	}
	server := cfg["server"].(map[string]interface{})
	delete(server, "dns")
	server["tokenizer"] = tok
	var backends, kvs, replays []string
	for _, p := range pods {
		backends = append(backends, "http://"+p.http)
		kvs = append(kvs, p.kv)
		replays = append(replays, p.replay)
	}
	server["backends"], server["kv_events"], server["replay_endpoints"] = backends, kvs, replays
	b, _ := json.Marshal(cfg)
	cfgPath := filepath.Join(t.TempDir(), "config.json")
	if err := os.WriteFile(cfgPath, b, 0o600); err != nil {
		t.Fatal(err)
	}
	startRouter := func(name string, extra ...string) string {
		addr := freeAddr(t)
		args := expandArgs(t, m.podEnv(t, kc, "10.1.9.9"), kc.Args)
		for i, a := range args {
			switch k, _, _ := strings.Cut(a, "="); k {
			case "--config":
				args[i] = k + "=" + cfgPath
			case "--listen":
				args[i] = k + "=" + addr
			}
		}
		startProc(t, name, append(args, extra...))
		waitHTTP(t, "http://"+addr+"/ready")
		return addr
	}
	router := startRouter("kvroute serve")
	onlyFirst := startRouter("kvroute serve --topic <pod 0's>", "--topic="+pods[0].topic)

	// Keep both pods busy until the router has batches from each (ZeroMQ drops what a
	// subscriber that is still joining would have received).
	prompt := make([]int, 40)
	for i := range prompt {
		prompt[i] = i + 1
	}
	body, _ := json.Marshal(map[string]interface{}{"prompt": prompt, "max_tokens": 2})
	var all, first map[string]int
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		for _, p := range pods {
			r, err := http.Post("http://"+p.http+"/v1/completions", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			r.Body.Close()
			if r.StatusCode != 200 {
				t.Fatalf("pod %s: /v1/completions: %s", p.http, r.Status)
			}
		}
		all, first = routerBatches(t, router), routerBatches(t, onlyFirst)
		if all[pods[0].http] > 0 && all[pods[1].http] > 0 && first[pods[0].http] > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, p := range pods {
		if all[p.http] == 0 {
			t.Errorf("kvroute serve with the ConfigMap's topic received no KV events from the pod on topic %q: %v", p.topic, all)
		}
	}
	if first[pods[0].http] == 0 || first[pods[1].http] != 0 {
		t.Errorf("a router subscribed to %q must receive that pod only: %v", pods[0].topic, first)
	}
}

// dockerInstr is one Dockerfile instruction: its keyword (upper case) and its text.
type dockerInstr struct{ cmd, arg string }

// parseDockerfile splits a Dockerfile into instructions (comments dropped, continuation
// lines joined) and groups them by stage (each FROM starts one).
func parseDockerfile(t *testing.T, path string) [][]dockerInstr {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var stages [][]dockerInstr
	var cur strings.Builder
	flush := func() {
		line := strings.TrimSpace(cur.String())
		cur.Reset()
		if line == "" {
			return
		}
		cmd, arg, _ := strings.Cut(line, " ")
		in := dockerInstr{strings.ToUpper(cmd), strings.TrimSpace(arg)}
		if in.cmd == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("%s: %s before the first FROM", path, in.cmd)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], in)
	}
	for _, l := range strings.Split(string(raw), "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "#") {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cur.WriteString(strings.TrimSuffix(l, "\\") + " ")
			continue
		}
		cur.WriteString(l)
		flush()
	}
	flush()
	return stages
}

// TestDockerfile checks the Dockerfile without a container engine (none runs here, and
// the base images cannot be pulled): every COPY source exists in the build context and is
// not excluded by .dockerignore, the build stage builds the package whose binary the final
// stage copies and runs, the runtime stage installs the shared libraries that binary
// needs beyond glibc, the image tag the manifests use carries the workspace's version, the
// exposed port is kvroute's container port, and the default command is a real subcommand.
func TestDockerfile(t *testing.T) {
	root := "../.."
	stages := parseDockerfile(t, filepath.Join(root, "Dockerfile"))
	if len(stages) != 2 {
		t.Fatalf("expected a build and a runtime stage, got %d", len(stages))
	}
	ignoreRaw, err := os.ReadFile(filepath.Join(root, ".dockerignore"))
	if err != nil {
		t.Fatalf("no .dockerignore: COPY . . would send target/ (gigabytes) as context: %v", err)
	}
	ignored := map[string]bool{}
	for _, l := range strings.Split(string(ignoreRaw), "\n") {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			ignored[strings.TrimSuffix(l, "/")] = true
		}
	}
	if !ignored["target"] {
		t.Errorf(".dockerignore must exclude target")
	}

	// Stage 1: the package, its binary, where the binary is put.
	buildName := ""
	if _, as, ok := strings.Cut(stages[0][0].arg, " AS "); ok {
		buildName = strings.TrimSpace(as)
	}
	var pkg, builtPath string
	cargoRe := regexp.MustCompile(`cargo build --release -p ([a-z0-9-]+)`)
	cpRe := regexp.MustCompile(`cp target/release/([a-z0-9_-]+) (\S+)`)
	for _, in := range stages[0] {
		switch in.cmd {
		case "COPY":
			fields := strings.Fields(in.arg)
			for _, src := range fields[:len(fields)-1] {
				if strings.HasPrefix(src, "--") {
					t.Fatalf("build stage COPY %s: no check for flags here; add one", in.arg)
				}
				if _, err := os.Stat(filepath.Join(root, src)); err != nil || ignored[src] {
					t.Errorf("COPY %s: not in the build context (%v)", src, err)
				}
			}
		case "RUN":
			if m := cargoRe.FindStringSubmatch(in.arg); m != nil {
				pkg = m[1]
			}
			if m := cpRe.FindStringSubmatch(in.arg); m != nil {
				if m[1] != "kvroute" {
					t.Errorf("the build stage copies target/release/%s; the binary is kvroute", m[1])
				}
				builtPath = m[2]
			}
		}
	}
	cargoToml, err := os.ReadFile(filepath.Join(root, "crates/cli/Cargo.toml"))
	if err != nil {
		t.Fatal(err)
	}
	if pkg == "" || !strings.Contains(string(cargoToml), fmt.Sprintf("name = %q", pkg)) ||
		!regexp.MustCompile(`(?s)\[\[bin\]\]\s*name = "kvroute"`).Match(cargoToml) {
		t.Errorf("the build stage must build crates/cli (package %q), whose binary is kvroute", pkg)
	}
	if builtPath == "" {
		t.Fatal("the build stage never copies target/release/kvroute out")
	}

	// Stage 2: the binary from stage 1, its libraries, port, entrypoint.
	var copied, entry, expose, apt string
	var cmd []string
	for _, in := range stages[1] {
		switch in.cmd {
		case "COPY":
			f := strings.Fields(in.arg)
			if len(f) != 3 || f[0] != "--from="+buildName || f[1] != builtPath {
				t.Errorf("runtime COPY %s: must copy %s from stage %s", in.arg, builtPath, buildName)
			} else {
				copied = f[2]
			}
		case "RUN":
			apt += in.arg
		case "EXPOSE":
			expose = in.arg
		case "ENTRYPOINT":
			var e []string
			if err := json.Unmarshal([]byte(in.arg), &e); err != nil || len(e) != 1 {
				t.Fatalf("ENTRYPOINT %s: want [\"/path/to/kvroute\"]", in.arg)
			}
			entry = e[0]
		case "CMD":
			if err := json.Unmarshal([]byte(in.arg), &cmd); err != nil {
				t.Fatalf("CMD %s: %v", in.arg, err)
			}
		}
	}
	if copied == "" || entry != copied {
		t.Errorf("ENTRYPOINT %q must be the copied binary %q", entry, copied)
	}
	if len(cmd) == 0 {
		t.Fatal("no CMD")
	}
	if out, err := exec.Command(kvrouteBin(t), append(cmd[:1:1], "--help")...).CombinedOutput(); err != nil {
		t.Errorf("CMD %v: kvroute %s --help fails: %v\n%s", cmd, cmd[0], err, out)
	}
	f, err := elf.Open(kvrouteBin(t))
	if err != nil {
		t.Fatal(err)
	}
	libs, err := f.ImportedLibraries()
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	// In debian:bookworm-slim already (libc6, libgcc-s1), or the package to install.
	base := regexp.MustCompile(`^(libc|libm|libdl|librt|libpthread|libgcc_s|ld-linux-x86-64)\.so`)
	pkgOf := map[string]string{"libstdc++.so.6": "libstdc++6"}
	for _, l := range libs {
		if base.MatchString(l) {
			continue
		}
		p, known := pkgOf[l]
		if !known {
			t.Errorf("kvroute needs %s: add its package to the runtime stage and here", l)
		} else if !regexp.MustCompile(`apt-get install[^&]*\s` + regexp.QuoteMeta(p) + `(\s|$)`).MatchString(apt) {
			t.Errorf("kvroute needs %s: the runtime stage must install %s", l, p)
		}
	}

	// The manifests run this image on kvroute's port.
	m := load(t)
	kr := m.deployment(t, "kvroute.yaml", "kvroute")
	kc := &kr.Spec.Template.Spec.Containers[0]
	if expose != strconv.Itoa(int(containerPort(t, kc, "http"))) {
		t.Errorf("EXPOSE %s != kvroute's containerPort http %d", expose, containerPort(t, kc, "http"))
	}
	ws, err := os.ReadFile(filepath.Join(root, "Cargo.toml"))
	if err != nil {
		t.Fatal(err)
	}
	ver := regexp.MustCompile(`(?m)^version = "([^"]+)"`).FindSubmatch(ws)
	if ver == nil {
		t.Fatal("no workspace version")
	}
	for _, d := range []*appsv1.Deployment{kr, m.deployment(t, "emulated/vllm-emulated.yaml", "vllm")} {
		if img := d.Spec.Template.Spec.Containers[0].Image; img != "kvroute:"+string(ver[1]) {
			t.Errorf("Deployment %s runs image %s; the Dockerfile builds kvroute:%s", d.Name, img, ver[1])
		}
	}
}
