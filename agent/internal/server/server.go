// Package server is the agent's HTTP API (PROTOCOL.md): routing, bearer
// authentication and JSON rendering on top of the process, filesystem,
// restore and stats packages.
package server

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
	"cocoon/agent/internal/disk"
	"cocoon/agent/internal/process"
	"cocoon/agent/internal/restore"
	"cocoon/agent/internal/stats"
	"cocoon/agent/internal/volume"
)

// Version is reported by GET /health.
const Version = "0.1.0"

// maxJSONBody bounds JSON request bodies (exec stdin travels inside them).
const maxJSONBody = 64 << 20

// Options configure a Server.
type Options struct {
	Token string
	// Restore defaults to restore.Real().
	Restore *restore.System
	// StatsRoot is the filesystem whose usage /stats reports ("/").
	StatsRoot string
	// Reaper defaults to process.DefaultReaper().
	Reaper *process.Reaper
	// Started is when the agent started (uptimeMs counts from it); it
	// defaults to now, but as PID 1 the boot happens before New.
	Started time.Time
	// RootDevice is the block device mounted on / (cocoon.root), grown by POST /disk/grow.
	RootDevice string
	// Disk defaults to disk.Real().
	Disk *disk.System
	// Volumes defaults to volume.Real().
	Volumes *volume.System
}

// Server implements http.Handler.
type Server struct {
	start     time.Time
	restore   *restore.System
	statsRoot string
	base      *process.BaseEnv
	procs     *process.Manager
	app       *process.Supervisor
	disk      *disk.System
	rootDev   string
	volumes   *volume.System

	mu        sync.RWMutex // protects tokenHash, hasToken and degraded
	tokenHash [sha256.Size]byte
	hasToken  bool
	degraded  string
}

func New(o Options) *Server {
	if o.Restore == nil {
		o.Restore = restore.Real()
	}
	if o.StatsRoot == "" {
		o.StatsRoot = "/"
	}
	if o.Reaper == nil {
		o.Reaper = process.DefaultReaper()
	}
	if o.Started.IsZero() {
		o.Started = time.Now()
	}
	if o.Disk == nil {
		o.Disk = disk.Real()
	}
	if o.Volumes == nil {
		o.Volumes = volume.Real()
	}
	s := &Server{start: o.Started, restore: o.Restore, statsRoot: o.StatsRoot, base: &process.BaseEnv{}, disk: o.Disk, rootDev: o.RootDevice, volumes: o.Volumes}
	s.procs = process.NewManager(o.Reaper)
	s.app = process.NewSupervisor(s.procs, s.base)
	s.SetToken(o.Token)
	return s
}

// App exposes the supervisor (tests tune its backoff).
func (s *Server) App() *process.Supervisor { return s.app }

// SetToken replaces the secret. An empty secret locks every authenticated
// route rather than opening them.
func (s *Server) SetToken(tok string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.tokenHash = sha256.Sum256([]byte(tok))
	s.hasToken = tok != ""
}

// SetDegraded makes /health report a boot failure.
func (s *Server) SetDegraded(msg string) {
	s.mu.Lock()
	s.degraded = msg
	s.mu.Unlock()
}

// Close stops the app.
func (s *Server) Close() { s.app.Stop() }

// authorized compares hashes so the comparison is constant-time whatever
// the lengths of the two secrets.
func (s *Server) authorized(r *http.Request) bool {
	h := r.Header.Get("Authorization")
	const prefix = "Bearer "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return false
	}
	got := sha256.Sum256([]byte(h[len(prefix):]))
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.hasToken && subtle.ConstantTimeCompare(got[:], s.tokenHash[:]) == 1
}

func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	path := r.URL.Path
	if path == "/health" {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			methodNotAllowed(w, "GET")
			return
		}
		s.health(w, r)
		return
	}
	if !s.authorized(r) {
		w.Header().Set("WWW-Authenticate", `Bearer realm="cocoon-agent"`)
		apierr.Write(w, apierr.New(http.StatusUnauthorized, apierr.CodeUnauthorized, "missing or invalid bearer token"))
		return
	}
	var m map[string]http.HandlerFunc
	switch path {
	case "/restore":
		m = map[string]http.HandlerFunc{"POST": s.handleRestore}
	case "/env":
		m = map[string]http.HandlerFunc{"GET": s.getEnv, "PUT": s.putEnv}
	case "/sync":
		m = map[string]http.HandlerFunc{"POST": s.sync}
	case "/stats":
		m = map[string]http.HandlerFunc{"GET": s.stats}
	case "/disk/grow":
		m = map[string]http.HandlerFunc{"POST": s.growDisk}
	case "/volumes/mount":
		m = map[string]http.HandlerFunc{"POST": s.mountVolumes}
	case "/exec":
		m = map[string]http.HandlerFunc{"POST": s.exec}
	case "/files":
		m = map[string]http.HandlerFunc{"GET": s.getFile, "HEAD": s.getFile, "PUT": s.putFile, "DELETE": s.deleteFile}
	case "/files/stat":
		m = map[string]http.HandlerFunc{"GET": s.statFile}
	case "/files/mkdir":
		m = map[string]http.HandlerFunc{"POST": s.mkdir}
	case "/pty":
		m = map[string]http.HandlerFunc{"GET": s.pty}
	case "/tunnel":
		m = map[string]http.HandlerFunc{"GET": s.tunnel}
	case "/app":
		m = map[string]http.HandlerFunc{"GET": s.getApp, "POST": s.postApp, "DELETE": s.deleteApp}
	case "/logs":
		m = map[string]http.HandlerFunc{"GET": s.logs}
	case "/hook":
		m = map[string]http.HandlerFunc{"POST": s.hook}
	default:
		if rest := strings.TrimPrefix(path, "/exec/"); rest != path && strings.HasSuffix(rest, "/kill") {
			m = map[string]http.HandlerFunc{"POST": s.execKill}
		}
	}
	if m == nil {
		apierr.Write(w, apierr.NotFound("no route for "+path))
		return
	}
	h, ok := m[r.Method]
	if !ok {
		allowed := make([]string, 0, len(m))
		for k := range m {
			allowed = append(allowed, k)
		}
		methodNotAllowed(w, strings.Join(allowed, ", "))
		return
	}
	h(w, r)
}

func methodNotAllowed(w http.ResponseWriter, allow string) {
	w.Header().Set("Allow", allow)
	apierr.Write(w, apierr.New(http.StatusMethodNotAllowed, apierr.CodeBadRequest, "method not allowed; allowed: "+allow))
}

func writeJSON(w http.ResponseWriter, status int, v interface{}) {
	b, err := json.Marshal(v)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_, _ = w.Write(append(b, '\n'))
}

var okBody = map[string]bool{"ok": true}

// decodeJSON reads the whole body into v. Draining to EOF matters beyond
// tidiness: net/http only starts watching for a client hang-up (which
// cancels r.Context()) once the body has been read to its end.
func decodeJSON(w http.ResponseWriter, r *http.Request, v interface{}, allowEmpty bool) error {
	body := http.MaxBytesReader(w, r.Body, maxJSONBody)
	b, err := io.ReadAll(body)
	if err != nil {
		return apierr.BadRequest("reading body: " + err.Error())
	}
	if len(strings.TrimSpace(string(b))) == 0 {
		if allowEmpty {
			return nil
		}
		return apierr.BadRequest("a JSON body is required")
	}
	if err := json.Unmarshal(b, v); err != nil {
		return apierr.BadRequest("invalid JSON body: " + err.Error())
	}
	return nil
}

type healthBody struct {
	Status   string `json:"status"`
	Version  string `json:"version"`
	UptimeMs int64  `json:"uptimeMs"`
	Error    string `json:"error,omitempty"`
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	s.mu.RLock()
	deg := s.degraded
	s.mu.RUnlock()
	b := healthBody{Status: "ok", Version: Version, UptimeMs: time.Since(s.start).Milliseconds()}
	if deg != "" {
		b.Status, b.Error = "degraded", deg
	}
	writeJSON(w, http.StatusOK, b)
}

func (s *Server) handleRestore(w http.ResponseWriter, r *http.Request) {
	var req restore.Request
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	if err := req.Validate(); err != nil {
		apierr.Write(w, apierr.BadRequest(err.Error()))
		return
	}
	// The secret is swapped only after everything else succeeded, so a
	// failed restore can be retried with the old secret.
	if err := s.restore.Apply(&req); err != nil {
		apierr.Write(w, apierr.Internal(err.Error()))
		return
	}
	s.SetToken(req.Token)
	writeJSON(w, http.StatusOK, okBody)
}

func (s *Server) getEnv(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.base.Get())
}

func (s *Server) putEnv(w http.ResponseWriter, r *http.Request) {
	var env map[string]string
	if err := decodeJSON(w, r, &env, false); err != nil {
		apierr.Write(w, err)
		return
	}
	for k, v := range env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(v, 0) {
			apierr.Write(w, apierr.BadRequest(fmt.Sprintf("invalid env entry %q", k)))
			return
		}
	}
	s.base.Set(env)
	writeJSON(w, http.StatusOK, okBody)
}

func (s *Server) sync(w http.ResponseWriter, r *http.Request) {
	syscall.Sync()
	writeJSON(w, http.StatusOK, okBody)
}

func (s *Server) stats(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, stats.Read(s.statsRoot))
}

// growWait bounds the wait for the guest kernel to see a device the host has just grown.
const growWait = 10 * time.Second

func (s *Server) growDisk(w http.ResponseWriter, r *http.Request) {
	var req struct {
		SizeBytes uint64 `json:"sizeBytes"`
	}
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	if req.SizeBytes == 0 {
		apierr.Write(w, apierr.BadRequest("sizeBytes is required"))
		return
	}
	res, err := s.disk.Grow(s.rootDev, s.statsRoot, req.SizeBytes, growWait)
	if err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, res)
}

func (s *Server) mountVolumes(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Volumes []volume.Mount `json:"volumes"`
	}
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	if err := s.volumes.MountAll(req.Volumes); err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, okBody)
}
