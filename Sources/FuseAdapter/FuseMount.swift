import CFuse3
import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// A mounted filesystem: a libfuse session, its mountpoint, and the loop that serves it.
public final class FuseMount {
    /// Where the mount is now (the server updates it from its mountpoint descriptor before
    /// unmounting: the directory may have been renamed since it was checked).
    public var mountpoint: String
    let filesystem: FuseFilesystem
    private var session: OpaquePointer?
    private var ops = makeOperations()
    private var argStorage: [UnsafeMutablePointer<CChar>?] = []

    /// Mounts. `fsName` shows up in `mount`/`df` (the image path); `readOnly` adds the `ro`
    /// option so the kernel refuses write opens even for root; `extraOptions` are the user's -o.
    /// `target`: what the mount is made on, when not `mountpoint` itself (a root mount is
    /// made on /proc/self/fd/N, the descriptor the checks looked at).
    public init(filesystem: FuseFilesystem, mountpoint: String, target: String? = nil, fsName: String, readOnly: Bool,
                extraOptions: [String], threads: Int = 8) throws {
        self.filesystem = filesystem
        self.mountpoint = mountpoint
        self.threads = threads
        var opts = ["fsname=" + Self.escapedOptionValue(fsName), "subtype=rawmount", "default_permissions"]
        if readOnly { opts.append("ro") }
        // The last max_read given wins, as libfuse reads its options.
        if let last = extraOptions.flatMap({ $0.split(separator: ",") }).last(where: { $0.hasPrefix("max_read=") }),
           let n = UInt32(last.dropFirst("max_read=".count)) {
            filesystem.maxRead.withLock { $0 = n }
        } else if readOnly {
            // Reads of at most 128 KiB: the kernel's read-ahead then keeps several in flight
            // and splits an O_DIRECT read into requests served at once (see `open`), where a
            // 1 MiB request is answered alone while the reader waits.
            opts.append("max_read=\(Self.readOnlyMaxRead)")
            filesystem.maxRead.withLock { $0 = Self.readOnlyMaxRead }
        }
        opts.append(contentsOf: extraOptions.filter { !$0.isEmpty })
        let argv = ["rawmount", "-o", opts.joined(separator: ",")]
        argStorage = argv.map { strdup($0) } + [nil]
        var args = rm_fuse_args_init(Int32(argv.count), &argStorage)
        let userdata = Unmanaged.passUnretained(filesystem).toOpaque()
        session = fuse_session_new(&args, &ops, MemoryLayout<fuse_lowlevel_ops>.size, userdata)
        guard session != nil else {
            // libfuse has printed which option it refused; name what it was given.
            throw BlockError.usage("\(mountpoint): libfuse refused the mount options (\(opts.dropFirst(3).joined(separator: ",")))")
        }
        if let problem = Self.fuseDeviceProblem() {
            fuse_session_destroy(session)
            session = nil
            throw BlockError.usage(problem)
        }
        if fuse_session_mount(session, target ?? mountpoint) != 0 {
            fuse_session_destroy(session)
            session = nil
            // libfuse or fusermount3 has printed its reason (to the user's terminal, also when detaching).
            throw BlockError.usage("\(mountpoint): the FUSE mount failed")
        }
        filesystem.session.set(session)
    }

    let threads: Int
    static let readOnlyMaxRead: UInt32 = 128 << 10
    static let detach: Int32 = 2, noFollow: Int32 = 8  // MNT_DETACH, UMOUNT_NOFOLLOW

    /// libfuse opens /dev/fuse as the calling user before anything else (fusermount3 only
    /// mounts); say plainly when that cannot work instead of a generic mount failure.
    static func fuseDeviceProblem() -> String? {
        var st = stat()
        guard stat("/dev/fuse", &st) == 0 else {
            return "/dev/fuse: not found (load the fuse module: modprobe fuse)"
        }
        guard access("/dev/fuse", R_OK | W_OK) != 0 else { return nil }
        let reason = String(cString: strerror(errno))
        let mode = String(st.st_mode & 0o777, radix: 8)
        return "/dev/fuse: \(reason) (mode \(mode); this user must be able to open it: most systems make it 0666, or mount as root)"
    }

    /// Serves requests until the mount goes away or SIGINT/SIGTERM/SIGHUP arrives.
    public func run() -> Int32 {
        guard let session else { return -1 }
        fuse_set_signal_handlers(session)
        let r = rm_session_loop_mt(session, UInt32(threads), 1)
        fuse_remove_signal_handlers(session)
        return r
    }

    /// Unmounts (lazily if still busy) and frees the session. Callers close the images after.
    public func unmount() {
        guard let session else { return }
        filesystem.session.set(nil)
        // The mount as the kernel shows it, never through a symlink put at its name since
        // (libfuse's own unmount below then finds it gone; for a mount made through
        // /proc/self/fd/N it could not unmount it anyway).
        // Only while this session's connection is alive (POLLERR: already unmounted), so a
        // mount made at the same path since is never touched.
        var p = pollfd(fd: fuse_session_fd(session), events: 0, revents: 0)
        let gone = poll(&p, 1, 0) == 1 && p.revents & Int16(POLLERR) != 0
        if geteuid() == 0 && !gone { _ = umount2(mountpoint, Self.detach | Self.noFollow) }
        fuse_session_unmount(session)
        fuse_session_destroy(session)
        self.session = nil
    }

    deinit {
        unmount()
        for p in argStorage { free(p) }
    }
}

extension FuseMount {
    /// `value` as one libfuse option value: libfuse's option parser splits on `,` and turns
    /// `\x` into `x` and `\ooo` into that byte, so every byte outside a plain set is written
    /// as `\ooo`. A file name then cannot end the value early, add options (`e\,allow_other`)
    /// or swallow the ones after it (a trailing `\`).
    static func escapedOptionValue(_ value: String) -> String {
        var out = ""
        for byte in value.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                 UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "/"), UInt8(ascii: "."),
                 UInt8(ascii: "_"), UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: ":"):
                out.unicodeScalars.append(Unicode.Scalar(byte))
            default:
                let octal = String(byte, radix: 8)
                out += "\\" + String(repeating: "0", count: 3 - octal.count) + octal
            }
        }
        return out
    }
}
