// Package process starts and supervises the guest's user processes: one-shot
// execs, interactive terminals and the single supervised app. All of them go
// through the Reaper so that, as PID 1, reaping orphans never steals their
// exit statuses.
package process

import (
	"fmt"
	"log"
	"os"
	"os/user"
	"path/filepath"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"cocoon/agent/internal/apierr"
)

// DefaultPath is PATH unless the base env or the request overrides it.
const DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Spec is what a client asks to run.
type Spec struct {
	Argv []string
	Env  map[string]string
	Cwd  string
	User string
}

// Prepared is a Spec resolved against the guest: program found on the
// target PATH, env merged, user looked up. Preparing before forking turns
// every foreseeable failure into a 400 that is sent before any stream.
type Prepared struct {
	Path string
	Argv []string
	Env  []string
	Dir  string
	// Cred is nil when the target user is the agent's own, so that host
	// testing as a normal user needs no privileges.
	Cred *syscall.Credential
}

// BaseEnv is the env every exec, terminal and app inherits (PUT /env). It is
// held in memory only, which is what lets it survive snapshots.
type BaseEnv struct {
	mu  sync.RWMutex // protects env
	env map[string]string
}

func (b *BaseEnv) Get() map[string]string {
	b.mu.RLock()
	defer b.mu.RUnlock()
	out := make(map[string]string, len(b.env))
	for k, v := range b.env {
		out[k] = v
	}
	return out
}

func (b *BaseEnv) Set(env map[string]string) {
	cp := make(map[string]string, len(env))
	for k, v := range env {
		cp[k] = v
	}
	b.mu.Lock()
	b.env = cp
	b.mu.Unlock()
}

type account struct {
	name     string
	home     string
	uid, gid uint32
	groups   []uint32
}

// lookupAccount resolves name (or numeric uid; empty = the agent's own user).
// os/user without cgo reads /etc/passwd and /etc/group of the current root,
// which after switch-root is the image's.
func lookupAccount(name string) (*account, error) {
	var u *user.User
	var err error
	switch {
	case name == "":
		u, err = user.LookupId(strconv.Itoa(os.Getuid()))
		if err != nil {
			// An image without /etc/passwd still gets a usable identity.
			uid := uint32(os.Getuid())
			a := &account{name: "root", home: "/", uid: uid, gid: uint32(os.Getgid())}
			if uid != 0 {
				a.name = strconv.Itoa(int(uid))
			}
			return a, nil
		}
	case isDigits(name):
		u, err = user.LookupId(name)
	default:
		u, err = user.Lookup(name)
	}
	if err != nil {
		return nil, apierr.BadRequest(fmt.Sprintf("unknown user %q", name))
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, apierr.BadRequest(fmt.Sprintf("user %q has a non-numeric uid/gid", name))
	}
	a := &account{name: u.Username, home: u.HomeDir, uid: uint32(uid), gid: uint32(gid)}
	if a.home == "" {
		a.home = "/"
	}
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				a.groups = append(a.groups, uint32(n))
			}
		}
	}
	return a, nil
}

func isDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return s != ""
}

// Owner resolves a user name to uid/gid for file ownership; empty means the
// agent's own user.
func Owner(name string) (uid, gid int, err error) {
	a, err := lookupAccount(name)
	if err != nil {
		return 0, 0, err
	}
	return int(a.uid), int(a.gid), nil
}

// Prepare resolves spec. base is the PUT /env map.
func Prepare(spec Spec, base map[string]string) (*Prepared, error) {
	if len(spec.Argv) == 0 || spec.Argv[0] == "" {
		return nil, apierr.BadRequest("empty argv")
	}
	acct, err := lookupAccount(spec.User)
	if err != nil {
		return nil, err
	}

	// Layering of PROTOCOL.md: defaults, then the base env, then the request.
	env := map[string]string{
		"PATH": DefaultPath,
		"HOME": acct.home,
		"USER": acct.name,
		"TERM": "xterm",
	}
	for k, v := range base {
		env[k] = v
	}
	for k, v := range spec.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			return nil, apierr.BadRequest(fmt.Sprintf("invalid env entry %q", k))
		}
		env[k] = v
	}

	dir := spec.Cwd
	if dir == "" {
		dir = acct.home
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			dir = "/"
		}
	} else {
		if !filepath.IsAbs(dir) {
			return nil, apierr.BadRequest(fmt.Sprintf("cwd must be absolute: %q", dir))
		}
		st, err := os.Stat(dir)
		if err != nil {
			return nil, apierr.BadRequest(fmt.Sprintf("cwd %q: %v", dir, unwrapPathErr(err)))
		}
		if !st.IsDir() {
			return nil, apierr.BadRequest(fmt.Sprintf("cwd %q is not a directory", dir))
		}
	}

	path, err := lookPath(spec.Argv[0], env["PATH"], dir)
	if err != nil {
		return nil, err
	}

	p := &Prepared{Path: path, Argv: append([]string(nil), spec.Argv...), Dir: dir}
	keys := make([]string, 0, len(env))
	for k := range env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		p.Env = append(p.Env, k+"="+env[k])
	}
	if os.Geteuid() == 0 || acct.uid != uint32(os.Geteuid()) || acct.gid != uint32(os.Getegid()) {
		p.Cred = &syscall.Credential{Uid: acct.uid, Gid: acct.gid, Groups: acct.groups}
	}
	return p, nil
}

// lookPath searches the PATH of the target env (not the agent's), so what
// runs is what the user's shell would run.
func lookPath(name, pathEnv, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := checkExecutable(p); err != nil {
			if os.IsNotExist(err) {
				return "", apierr.CommandNotFound(fmt.Sprintf("command not found: %q", name))
			}
			return "", apierr.BadRequest(fmt.Sprintf("cannot execute %q: %v", name, err))
		}
		return p, nil
	}
	var lastErr error
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, name)
		err := checkExecutable(p)
		if err == nil {
			return p, nil
		}
		if !os.IsNotExist(err) && lastErr == nil {
			lastErr = err
		}
	}
	if lastErr != nil {
		return "", apierr.BadRequest(fmt.Sprintf("cannot execute %q: %v", name, lastErr))
	}
	return "", apierr.CommandNotFound(fmt.Sprintf("command not found: %q", name))
}

var errNotExecutable = fmt.Errorf("permission denied (not executable)")
var errIsDir = fmt.Errorf("is a directory")

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return unwrapPathErr(err)
	}
	if st.IsDir() {
		return errIsDir
	}
	if st.Mode()&0o111 == 0 {
		return errNotExecutable
	}
	return nil
}

func unwrapPathErr(err error) error {
	if pe, ok := err.(*os.PathError); ok {
		return pe.Err
	}
	return err
}

// startError classifies a fork/exec failure of a prepared spec; everything
// the caller could have gotten wrong is a 400.
func startError(p *Prepared, err error) error {
	switch err {
	case syscall.ENOENT:
		return apierr.CommandNotFound(fmt.Sprintf("command not found: %q", p.Argv[0]))
	case syscall.EACCES, syscall.EPERM, syscall.ENOEXEC, syscall.ENOTDIR, syscall.EINVAL:
		return apierr.BadRequest(fmt.Sprintf("cannot start %q: %v", p.Argv[0], err))
	}
	return apierr.Internal(fmt.Sprintf("cannot start %q: %v", p.Argv[0], err))
}

func recoverLog(what string) {
	if v := recover(); v != nil {
		// A panic escaping a goroutine would exit PID 1, i.e. panic the
		// kernel; log it and let just this goroutine end instead.
		log.Printf("cocoon-agent: panic in %s: %v\n%s", what, v, debug.Stack())
	}
}
