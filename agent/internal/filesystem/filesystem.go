// Package filesystem implements the /files routes' operations on the guest's
// filesystem. Every error it returns is an *apierr.Error carrying the
// protocol's status.
package filesystem

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"cocoon/agent/internal/apierr"
)

// Info is a stat result (GET /files/stat, and listing entries without uid,
// gid and linkTarget).
type Info struct {
	Path       string `json:"path,omitempty"`
	Name       string `json:"name"`
	Type       string `json:"type"` // file | dir | symlink | other
	Size       int64  `json:"size"`
	Mode       string `json:"mode"` // octal permission bits, "0644"
	Mtime      string `json:"mtime"`
	UID        *int   `json:"uid,omitempty"`
	GID        *int   `json:"gid,omitempty"`
	LinkTarget string `json:"linkTarget,omitempty"`
}

// Listing is GET /files on a directory.
type Listing struct {
	Path    string `json:"path"`
	Entries []Info `json:"entries"`
}

// CleanPath checks that p is absolute and cleans it.
func CleanPath(p string) (string, error) {
	if p == "" {
		return "", apierr.BadRequest("path is required")
	}
	if !filepath.IsAbs(p) {
		return "", apierr.BadRequest(fmt.Sprintf("path must be absolute: %q", p))
	}
	if strings.ContainsRune(p, 0) {
		return "", apierr.BadRequest("path contains NUL")
	}
	return filepath.Clean(p), nil
}

// classify maps an OS error to the protocol's: missing → 404, a file where a
// directory is expected (or the reverse), or a full disk → 409.
func classify(err error) error {
	var pe *fs.PathError
	msg := err.Error()
	if errors.As(err, &pe) {
		msg = pe.Path + ": " + pe.Err.Error()
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return apierr.NotFound(msg)
	case errors.Is(err, syscall.ENOTDIR), errors.Is(err, syscall.EISDIR),
		errors.Is(err, syscall.ENOTEMPTY), errors.Is(err, syscall.EEXIST), errors.Is(err, syscall.EBUSY),
		errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT), errors.Is(err, syscall.EFBIG):
		return apierr.Conflict(msg)
	case errors.Is(err, fs.ErrPermission), errors.Is(err, syscall.EROFS), errors.Is(err, syscall.EINVAL),
		errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.ELOOP):
		return apierr.BadRequest(msg)
	}
	return apierr.Internal(msg)
}

func typeOf(m fs.FileMode) string {
	switch {
	case m.IsRegular():
		return "file"
	case m.IsDir():
		return "dir"
	case m&fs.ModeSymlink != 0:
		return "symlink"
	}
	return "other"
}

// FormatMode renders permission bits plus setuid/setgid/sticky as octal.
func FormatMode(m fs.FileMode) string {
	v := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		v |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		v |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		v |= 0o1000
	}
	return fmt.Sprintf("%04o", v)
}

// ParseMode parses an octal mode ("0644", "755"); empty gives def.
func ParseMode(s string, def fs.FileMode) (fs.FileMode, error) {
	if s == "" {
		return def, nil
	}
	v, err := strconv.ParseUint(s, 8, 32)
	if err != nil || v > 0o7777 {
		return 0, apierr.BadRequest(fmt.Sprintf("invalid mode %q", s))
	}
	m := fs.FileMode(v & 0o777)
	if v&0o4000 != 0 {
		m |= fs.ModeSetuid
	}
	if v&0o2000 != 0 {
		m |= fs.ModeSetgid
	}
	if v&0o1000 != 0 {
		m |= fs.ModeSticky
	}
	return m, nil
}

func infoOf(name string, fi fs.FileInfo) Info {
	return Info{
		Name:  name,
		Type:  typeOf(fi.Mode()),
		Size:  fi.Size(),
		Mode:  FormatMode(fi.Mode()),
		Mtime: fi.ModTime().UTC().Format(time.RFC3339Nano),
	}
}

// Stat lstat()s p.
func Stat(p string) (*Info, error) {
	fi, err := os.Lstat(p)
	if err != nil {
		return nil, classify(err)
	}
	in := infoOf(filepath.Base(p), fi)
	in.Path = p
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		uid, gid := int(st.Uid), int(st.Gid)
		in.UID, in.GID = &uid, &gid
	}
	if fi.Mode()&fs.ModeSymlink != 0 {
		if t, err := os.Readlink(p); err == nil {
			in.LinkTarget = t
		}
	}
	return &in, nil
}

// Open opens p for GET /files: a regular file (with its size) or, when p is
// a directory, its listing. Symlinks are followed.
func Open(p string) (f *os.File, size int64, list *Listing, err error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, 0, nil, classify(err)
	}
	if fi.IsDir() {
		l, err := List(p)
		return nil, 0, l, err
	}
	if !fi.Mode().IsRegular() {
		// Reading a FIFO or device could block or never end.
		return nil, 0, nil, apierr.Conflict(fmt.Sprintf("%s: not a regular file", p))
	}
	f, err = os.Open(p)
	if err != nil {
		return nil, 0, nil, classify(err)
	}
	// Size from the open file, so Content-Length matches what we send.
	if fi, err = f.Stat(); err != nil {
		f.Close()
		return nil, 0, nil, classify(err)
	}
	return f, fi.Size(), nil, nil
}

// List lists directory p, sorted by name; entry types are not followed.
func List(p string) (*Listing, error) {
	des, err := os.ReadDir(p)
	if err != nil {
		return nil, classify(err)
	}
	l := &Listing{Path: p, Entries: make([]Info, 0, len(des))}
	for _, de := range des {
		fi, err := de.Info()
		if err != nil {
			continue // vanished since ReadDir
		}
		l.Entries = append(l.Entries, infoOf(de.Name(), fi))
	}
	sort.Slice(l.Entries, func(i, j int) bool { return l.Entries[i].Name < l.Entries[j].Name })
	return l, nil
}

// Owner is who created files and directories belong to; nil keeps the
// agent's own.
type Owner struct{ UID, GID int }

// mkdirAll is os.MkdirAll that also chowns the directories it creates.
func mkdirAll(p string, owner *Owner) error {
	fi, err := os.Stat(p)
	if err == nil {
		if !fi.IsDir() {
			return apierr.Conflict(fmt.Sprintf("%s: exists and is not a directory", p))
		}
		return nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return classify(err)
	}
	if parent := filepath.Dir(p); parent != p {
		if err := mkdirAll(parent, owner); err != nil {
			return err
		}
	}
	if err := os.Mkdir(p, 0o755); err != nil {
		if errors.Is(err, fs.ErrExist) {
			if fi, err2 := os.Stat(p); err2 == nil && fi.IsDir() {
				return nil // created concurrently
			}
		}
		return classify(err)
	}
	if owner != nil {
		if err := os.Lchown(p, owner.UID, owner.GID); err != nil {
			return classify(err)
		}
	}
	return nil
}

// Mkdir is mkdir -p.
func Mkdir(p string, owner *Owner) error { return mkdirAll(p, owner) }

// Write streams r into p atomically: a temp file beside the target, fsync,
// chmod/chown, rename, then fsync of the directory so the rename itself is
// durable before a snapshot. mode nil keeps an existing file's mode, else
// 0644.
func Write(p string, r io.Reader, mode *fs.FileMode, owner *Owner) (int64, error) {
	if p == "/" {
		return 0, apierr.Conflict("/: is a directory")
	}
	m := fs.FileMode(0o644)
	if fi, err := os.Stat(p); err == nil {
		if fi.IsDir() {
			return 0, apierr.Conflict(fmt.Sprintf("%s: is a directory", p))
		}
		m = fi.Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
	}
	if mode != nil {
		m = *mode
	}
	dir := filepath.Dir(p)
	if err := mkdirAll(dir, owner); err != nil {
		return 0, err
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(p)+".cocoon-*")
	if err != nil {
		return 0, classify(err)
	}
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	n, err := io.Copy(tmp, r)
	if err != nil {
		// The guest's disk refusing the data is the VM's state; anything else is the request body's fault.
		if c := apierr.From(classify(err)); c.Code == apierr.CodeConflict {
			return 0, c
		}
		return 0, apierr.BadRequest(fmt.Sprintf("writing %s: %v", p, err))
	}
	// Explicit chmod: CreateTemp's 0600 and the umask must not decide it.
	if err := tmp.Chmod(m); err != nil {
		return 0, classify(err)
	}
	if owner != nil {
		if err := tmp.Chown(owner.UID, owner.GID); err != nil {
			return 0, classify(err)
		}
		// chown clears setuid/setgid; put them back.
		if m&(fs.ModeSetuid|fs.ModeSetgid) != 0 {
			if err := tmp.Chmod(m); err != nil {
				return 0, classify(err)
			}
		}
	}
	if err := tmp.Sync(); err != nil {
		return 0, classify(err)
	}
	if err := tmp.Close(); err != nil {
		return 0, classify(err)
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return 0, classify(err)
	}
	ok = true
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return n, nil
}

// Remove deletes p; a non-empty directory needs recursive.
func Remove(p string, recursive bool) error {
	if p == "/" {
		return apierr.BadRequest("refusing to remove /")
	}
	fi, err := os.Lstat(p)
	if err != nil {
		return classify(err)
	}
	if recursive && fi.IsDir() {
		if err := os.RemoveAll(p); err != nil {
			return classify(err)
		}
		return nil
	}
	if err := os.Remove(p); err != nil {
		return classify(err)
	}
	return nil
}
