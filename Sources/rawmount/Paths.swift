#if canImport(Glibc)
import Glibc
#endif
import BlockEngine

enum Paths {
    static func realPath(_ path: String) throws -> String {
        guard let p = realpath(path, nil) else {
            throw BlockError.io(file: path, operation: "resolve path", offset: nil, errno: errno)
        }
        defer { free(p) }
        return String(cString: p)
    }

    /// `path` made absolute with its directory resolved, but its last component kept as
    /// named (a symlinked image stays the link, as QEMU opens it).
    static func asNamed(_ path: String) throws -> String {
        var trimmed = path
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        let dir = PathName.directory(of: trimmed)
        let resolved = try realPath(dir.isEmpty ? "." : dir)
        return (resolved == "/" ? "" : resolved) + "/" + PathName.baseName(trimmed)
    }

    /// Like `realPath`, but also for a FUSE mountpoint whose server died: stat on it fails
    /// with ENOTCONN, so its parent is resolved instead.
    static func mountpointPath(_ path: String) throws -> String {
        do { return try realPath(path) } catch let error as BlockError {
            guard error.errnoValue == ENOTCONN else { throw error }
            return try asNamed(path)
        }
    }

    /// `win.vmdk` -> `win.raw`; a name without extension just gains `.raw`.
    static func rawName(forImage path: String) -> String {
        let base = PathName.baseName(path)
        if let dot = base.lastIndex(of: "."), dot != base.startIndex {
            return String(base[..<dot]) + ".raw"
        }
        return base + ".raw"
    }

    /// `<stem>-p<N>.raw`, partition N of the disk (numbered as kpartx does).
    static func partitionName(forImage path: String, index: Int) -> String {
        String(rawName(forImage: path).dropLast(4)) + "-p\(index).raw"
    }

    /// `<stem>.dirty-<name>.raw`, the view of one dirty bitmap. Bytes of the name that a file
    /// name cannot hold or that would mislead (`/`, `%`, `#`, control characters, bytes
    /// outside printable ASCII and UTF-8 letters) become `%XX`; a name that would make the
    /// file name longer than 255 bytes is shown as `#<position in the directory>` instead.
    static func dirtyViewName(forImage path: String, bitmap: String, index: Int) -> String {
        let stem = String(rawName(forImage: path).dropLast(4))
        var escaped = ""
        for scalar in bitmap.unicodeScalars {
            let v = scalar.value
            if v < 0x20 || v == 0x7F || (0x80 ..< 0xA0).contains(v) || scalar == "/" || scalar == "%" || scalar == "#" || scalar == "\u{FFFD}" {
                for byte in String(scalar).utf8 { escaped += "%" + String(byte >> 4, radix: 16, uppercase: true) + String(byte & 15, radix: 16, uppercase: true) }
            } else {
                escaped.unicodeScalars.append(scalar)
            }
        }
        let name = "\(stem).dirty-\(escaped).raw"
        return name.utf8.count <= 255 ? name : "\(stem).dirty-#\(index + 1).raw"
    }

    /// Where serving processes record their pids: /run/rawmount for root; for others
    /// /run/user/<uid>/rawmount (the user's runtime folder, $XDG_RUNTIME_DIR, which no other
    /// user can touch) when it exists, else /tmp/rawmount-<uid>. /tmp is shared, so that folder
    /// must be a real directory (not a link) owned by this user and writable by nobody else; it
    /// is created 0700.
    static func stateDirectory() throws -> String {
        let uid = getuid()
        let runtime = "/run/user/\(uid)"
        var rt = stat()
        let private_ = uid != 0 && lstat(runtime, &rt) == 0 && rt.st_mode & S_IFMT == S_IFDIR && rt.st_uid == uid && rt.st_mode & 0o077 == 0
        let dir = uid == 0 ? "/run/rawmount" : private_ ? runtime + "/rawmount" : "/tmp/rawmount-\(uid)"
        if mkdir(dir, 0o700) != 0 && errno != EEXIST {
            throw BlockError.io(file: dir, operation: "create the pid folder", offset: nil, errno: errno)
        }
        var st = stat()
        guard lstat(dir, &st) == 0 else { throw BlockError.io(file: dir, operation: "lstat", offset: nil, errno: errno) }
        guard st.st_mode & S_IFMT == S_IFDIR else {
            throw BlockError.usage("\(dir): the pid folder is not a directory (a link or a file is in its place); remove it")
        }
        guard st.st_uid == uid, st.st_mode & 0o022 == 0 else {
            let fix = st.st_uid == uid ? "remove it and rawmount makes it again"
                : "another user made it: ask an administrator to remove it, or log in through a session that has /run/user/\(uid) (systemd-logind), which rawmount then uses"
            throw BlockError.usage("\(dir): the pid folder is owned by uid \(st.st_uid) with mode \(String(st.st_mode & 0o777, radix: 8)); "
                + "it must belong to uid \(uid) and be writable by nobody else (\(fix))")
        }
        return dir
    }

    /// Where a serving process records its pid, keyed by the canonical mountpoint.
    static func pidFile(forMountpoint mp: String) throws -> String {
        let dir = try stateDirectory()
        var name = ""
        for c in mp.unicodeScalars {
            switch c {
            case "/": name += "%2F"
            case "%": name += "%25"
            default: name.unicodeScalars.append(c)
            }
        }
        return dir + "/" + name + ".pid"
    }

    /// Where a server serving through `--overlay` records the overlay's path, for `list`.
    static func overlayFile(forMountpoint mp: String) throws -> String { try pidFile(forMountpoint: mp) + ".overlay" }

    /// Where a detached server leaves what went wrong while closing, for `unmount` to report.
    static func closeErrorFile(forMountpoint mp: String) throws -> String { try pidFile(forMountpoint: mp) + ".error" }

    /// Writes a small state file; never through a link someone placed at its name.
    static func writeFile(_ path: String, _ text: String) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0o644)
        guard fd >= 0 else { return }
        _ = text.withCString { write(fd, $0, strlen($0)) }
        close(fd)
    }

    /// Why `mp` (resolved) must not be a mountpoint: pseudo file systems (proc, sysfs, devtmpfs,
    /// cgroup...) and anything inside /proc, /sys or /dev, where a mount hides what the
    /// system and rawmount itself rely on. nil: it may be used.
    /// The mountpoint resolved once to a descriptor (O_PATH|O_NOFOLLOW): the checks look at
    /// the object it holds, and a root mount mounts exactly that object through
    /// /proc/self/fd/N, so swapping the checked path for a symlink afterwards (while a slow
    /// backing chain opens) redirects nothing.
    struct Mountpoint {
        let fd: Int32
        let path: String
        let mode: mode_t
        let identity: (device: UInt64, inode: UInt64)

        /// What a root mount(2) is given; fusermount3 (other users) makes its own checks on the path.
        var mountTarget: String { geteuid() == 0 ? "/proc/self/fd/\(fd)" : path }

        static func open(resolved mp: String, named: String) throws -> Mountpoint {
            let fd = Glibc.open(mp, 0o10000000 /* O_PATH */ | O_NOFOLLOW | O_CLOEXEC)
            guard fd >= 0 else { throw BlockError.usage("mountpoint \(named): \(String(cString: strerror(errno)))") }
            var st = stat()
            guard fstat(fd, &st) == 0 else {
                let e = errno
                close(fd)
                throw BlockError.io(file: named, operation: "stat", offset: nil, errno: e)
            }
            // realpath resolved every link; one now means the path was changed since.
            let now = Paths.descriptorPath(fd)
            guard st.st_mode & S_IFMT != S_IFLNK, now == mp else {
                close(fd)
                throw BlockError.usage("mountpoint \(named): it changed while it was being checked (now \(now ?? "unknown")); not mounting")
            }
            return Mountpoint(fd: fd, path: mp, mode: st.st_mode & S_IFMT,
                              identity: (UInt64(st.st_dev), UInt64(st.st_ino)))
        }

        /// Still the object checked at `path`? (Read where the mount is reported and recorded.)
        var currentPath: String? { Paths.descriptorPath(fd) }
    }

    /// The path the kernel shows for descriptor `fd`.
    static func descriptorPath(_ fd: Int32) -> String? {
        var buf = [UInt8](repeating: 0, count: 4096)
        let n = buf.withUnsafeMutableBytes { readlink("/proc/self/fd/\(fd)", $0.baseAddress!.assumingMemoryBound(to: CChar.self), 4096) }
        guard n > 0 else { return nil }
        return String(decoding: buf[0..<n], as: UTF8.self)
    }

    static func unsuitableMountpoint(_ mp: String) -> String? {
        for top in ["/proc", "/sys", "/dev"] where mp == top || mp.hasPrefix(top + "/") {
            return "it is inside \(top), which belongs to the kernel"
        }
        let pseudo: Set<String> = ["proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs",
                                   "tracefs", "bpf", "pstore", "efivarfs", "configfs", "fusectl", "binfmt_misc", "mqueue",
                                   "autofs", "rpc_pipefs", "nsfs", "selinuxfs"]
        if let type = MountTable.fileSystemType(containing: mp), pseudo.contains(type) {
            return "it is on \(type), a kernel pseudo file system"
        }
        return nil
    }

    static func readFile(_ path: String) -> String? {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var out = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            out += buf[0..<n]
        }
        return String(decoding: out, as: UTF8.self)
    }
}

/// Prints one line to stderr, its control characters written out (a file name or a string
/// from an image must not forge a line or drive the terminal).
func printError(_ text: String) {
    let line = (text.hasSuffix("\n") ? String(text.dropLast()) : text).escapingControls + "\n"
    _ = line.withCString { write(2, $0, strlen($0)) }
}

/// Swift's print for this program's reports: every control character but line breaks and tabs
/// is written out, so a string from an image (a snapshot or bitmap name, a backing file name)
/// cannot send escape sequences to the terminal. Strings that could forge a line are escaped
/// where they are put in (`escapingControls`).
func print(_ items: Any..., separator: String = " ", terminator: String = "\n") {
    Swift.print(items.map { "\($0)" }.joined(separator: separator).escapingControlsButLines, terminator: terminator)
}

/// A message for any error: BlockError's sentence, or the error's own description.
/// `forceShare`: whether the command takes -U (--force-share); a lock refusal by one that
/// does not (it changes the image, or it has no such option) says to free the image first
/// instead of pointing at an option the command refuses.
func describe(_ error: Error, forceShare: Bool = true) -> String {
    if let e = error as? BlockError {
        // Lock refusals name who holds the image when that can be found.
        if case let .locked(file, _) = e {
            let holders = Holders.lockHolders(of: file) ?? "is it mounted, or in use by QEMU?"
            let sentence = "\(e.description(hintingForceShare: forceShare)) (\(holders))"
            return forceShare ? sentence : sentence + "; unmount it or stop that program first"
        }
        return e.description
    }
    return "\(error)"
}

/// Keeps `object` alive until the process ends, for a device already closed just before the
/// process exits: a split image's thousands of extents and caches cost more to free one by
/// one (10 ms and more) than everything else the command does once its work is done.
func keepUntilExit(_ object: AnyObject) {
    _ = Unmanaged.passRetained(object)
}
