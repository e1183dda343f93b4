package server

import (
	"encoding/base64"
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"time"

	"cocoon/agent/internal/apierr"
	"cocoon/agent/internal/process"
)

type execRequest struct {
	Argv        []string          `json:"argv"`
	Shell       *string           `json:"shell"`
	Env         map[string]string `json:"env"`
	Cwd         string            `json:"cwd"`
	User        string            `json:"user"`
	Stdin       *string           `json:"stdin"`
	StdinBase64 *string           `json:"stdinBase64"`
	TimeoutMs   int64             `json:"timeoutMs"`
}

type startedEvent struct {
	Type string `json:"type"`
	Pid  int    `json:"pid"`
}

type dataEvent struct {
	Type string `json:"type"`
	Data []byte `json:"data"` // base64 in JSON
}

type exitEvent struct {
	Type       string `json:"type"`
	ExitCode   int    `json:"exitCode"`
	Signal     string `json:"signal"`
	TimedOut   bool   `json:"timedOut"`
	DurationMs int64  `json:"durationMs"`
}

func (s *Server) exec(w http.ResponseWriter, r *http.Request) {
	var req execRequest
	if err := decodeJSON(w, r, &req, false); err != nil {
		apierr.Write(w, err)
		return
	}
	var argv []string
	switch {
	case req.Shell != nil && len(req.Argv) > 0:
		apierr.Write(w, apierr.BadRequest("give exactly one of argv and shell"))
		return
	case req.Shell != nil:
		argv = []string{"/bin/sh", "-c", *req.Shell}
	case len(req.Argv) > 0:
		argv = req.Argv
	default:
		apierr.Write(w, apierr.BadRequest("one of argv and shell is required"))
		return
	}
	var input []byte
	switch {
	case req.Stdin != nil && req.StdinBase64 != nil:
		apierr.Write(w, apierr.BadRequest("give at most one of stdin and stdinBase64"))
		return
	case req.Stdin != nil:
		input = []byte(*req.Stdin)
	case req.StdinBase64 != nil:
		b, err := base64.StdEncoding.DecodeString(*req.StdinBase64)
		if err != nil {
			apierr.Write(w, apierr.BadRequest("invalid stdinBase64: "+err.Error()))
			return
		}
		input = b
	}
	if req.TimeoutMs < 0 {
		apierr.Write(w, apierr.BadRequest("timeoutMs must not be negative"))
		return
	}
	prep, err := process.Prepare(process.Spec{Argv: argv, Env: req.Env, Cwd: req.Cwd, User: req.User}, s.base.Get())
	if err != nil {
		apierr.Write(w, err)
		return
	}
	e, err := s.procs.StartExec(prep, input)
	if err != nil {
		apierr.Write(w, err)
		return
	}

	flusher, _ := w.(http.Flusher)
	line := func(v interface{}) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if _, err := w.Write(append(b, '\n')); err != nil {
			return err
		}
		if flusher != nil {
			flusher.Flush()
		}
		return nil
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	_ = line(startedEvent{Type: "started", Pid: e.Pid})
	res := e.Run(r.Context(), time.Duration(req.TimeoutMs)*time.Millisecond, func(stream string, data []byte) error {
		return line(dataEvent{Type: stream, Data: data})
	})
	_ = line(exitEvent{Type: "exit", ExitCode: res.ExitCode, Signal: res.Signal, TimedOut: res.TimedOut, DurationMs: res.DurationMs})
}

func (s *Server) execKill(w http.ResponseWriter, r *http.Request) {
	rest := strings.TrimSuffix(strings.TrimPrefix(r.URL.Path, "/exec/"), "/kill")
	pid, err := strconv.Atoi(rest)
	if err != nil || pid <= 0 {
		apierr.Write(w, apierr.NotFound("no running exec "+strconv.Quote(rest)))
		return
	}
	var req struct {
		Signal string `json:"signal"`
	}
	if err := decodeJSON(w, r, &req, true); err != nil {
		apierr.Write(w, err)
		return
	}
	sig, err := process.ParseSignal(req.Signal)
	if err != nil {
		apierr.Write(w, apierr.BadRequest(err.Error()))
		return
	}
	if err := s.procs.Kill(pid, sig); err != nil {
		apierr.Write(w, err)
		return
	}
	writeJSON(w, http.StatusOK, okBody)
}
