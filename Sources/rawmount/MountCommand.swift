import ArgumentParser
import BlockEngine
import FuseAdapter
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

struct MountCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mount",
        abstract: "Mount IMAGE so that its guest disk appears as a raw file.",
        // One line per paragraph: the help printer wraps them itself.
        discussion: "If MOUNTPOINT is a directory, it shows <image name>.raw (win.vmdk -> win.raw). "
            + "If it is an existing regular file, that file becomes the raw view. Returns once the raw file is ready; "
            + "without --foreground the serving process detaches. Stop it with `rawmount unmount`." + Examples.section("mount"))

    @Flag(name: [.customShort("r"), .long], help: "Mount read-only: the image is opened O_RDONLY and never changes.")
    var readOnly = false

    @Flag(name: [.customShort("U"), .customLong("force-share")],
          help: "With --read-only: take no image locks, so an image that a VM or another tool has open for writing can be read (what it shows can change under you, as with qemu-img -U).")
    var forceShare = false

    @Option(name: [.customShort("l"), .customLong("snapshot")],
            help: "qcow2: show this internal snapshot (its ID or name, as `qemu-img snapshot -l` lists them) instead of the current disk; always read-only.")
    var snapshot: String?

    @Option(name: [.customShort("f"), .long], help: "Image format (\(ImageFormat.allCases.map(\.rawValue).joined(separator: ", "))); probed when omitted.",
            completion: .list(ImageFormat.allCases.map(\.rawValue)))
    var format: String?

    @Flag(name: [.customShort("F"), .long], help: "Stay in the foreground and serve until unmounted or signalled.")
    var foreground = false

    @Option(name: .customShort("o"), help: ArgumentHelp("Mount options, comma-separated, as mount(8) and fstab pass them: rawmount's own (ro, format=, snapshot=, overlay=, overlay_cluster_size=, log=, uid=, gid=, umask=, force_share, no_partitions), FUSE's (allow_other, nosuid, nodev, noexec, ...); mount(8)'s defaults, nofail, _netdev, auto, noauto, user, users and x-* are ignored.", valueName: "options"))
    var options: [String] = []

    @Option(help: "Write into this qcow2 instead of the image: created over the image (its backing file, recorded by absolute path) on first use, reused when it already backs onto it. The image is opened read-only and never changes.")
    var overlay: String?

    @Option(help: "Cluster size of a new --overlay (4K for fine-grained overlays).")
    var overlayClusterSize: String = "64K"

    @Flag(name: .customLong("no-partitions"),
          help: "Do not show the disk's partitions as <stem>-p<N>.raw next to <stem>.raw (directory mountpoints only).")
    var noPartitions = false

    @Option(name: .long, help: "Append each failed request (read, write, flush...) with its cause to this file; the detached server has no terminal.")
    var log: String?

    @Option(name: .customLong("ready-fd"), help: .hidden)
    var readyFd: Int32?

    @Argument(help: "The disk image.", completion: .file())
    var image: String

    @Argument(help: "An existing directory or regular file to mount on.", completion: .file())
    var mountpoint: String

    @Flag(name: [.customShort("q"), .long], help: "Print nothing on success (by default the paths of the files shown are printed).")
    var quiet = false

    @Flag(name: [.customShort("v"), .long], help: "Report each failed request with its cause: on stderr with --foreground, else to syslog (journalctl -t rawmount).")
    var verbose = false

    /// The flags and every `-o` list together (mount(8) passes only `-o`).
    func settings() throws -> MountSettings {
        var s = MountSettings()
        s.readOnly = readOnly; s.readOnlyFlag = readOnly; s.forceShare = forceShare; s.format = format; s.snapshot = snapshot
        s.overlay = overlay; s.overlayClusterSize = overlayClusterSize; s.log = log; s.noPartitions = noPartitions
        for list in options { try s.apply(optionList: list) }
        return s
    }

    func validate() throws {
        let s: MountSettings
        do { s = try settings() } catch { throw ValidationError(describe(error)) }
        if s.forceShare && !s.readOnly {
            throw ValidationError("--force-share needs --read-only: a writer must hold the image's locks")
        }
        if s.overlay != nil && s.snapshot != nil {
            throw ValidationError("--overlay and --snapshot do not go together")
        }
        if let format = s.format, ImageFormat(rawValue: format.lowercased()) == nil {
            throw ValidationError("unknown format '\(format)'; known: \(ImageFormat.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    func run() throws {
        if !foreground && readyFd == nil {
            throw ExitCode(Detach.spawnAndWait(arguments: Array(CommandLine.arguments.dropFirst()), quiet: quiet))
        }
        do {
            try serve()
        } catch {
            report(describe(error))
            throw ExitCode.failure
        }
    }

    /// Tests only: a pause between the checks and the mount (as a slow backing chain makes).
    static let testPauseBeforeMount: UInt32 = getenv("RAWMOUNT_TEST_PAUSE_BEFORE_MOUNT_US").flatMap { UInt32(String(cString: $0)) } ?? 0

    /// Sends a message to the waiting parent (detached mode) or prints it.
    private func report(_ message: String) {
        if let fd = readyFd {
            // One line per message: a newline from an image name must not forge a verdict.
            _ = "error: \(message.escapingControls)\n".withCString { write(fd, $0, strlen($0)) }
            close(fd)
        } else {
            printError("rawmount: \(message)")
        }
    }

    private func serve() throws {
        let s = try settings()
        // Spawned through /proc/self/exe, the server would show as "exe" in ps and in the
        // lock-holder messages of other rawmount commands.
        if readyFd != nil {
            // The waiting parent may be gone (killed, its terminal closed): a write to the
            // status pipe then fails with EPIPE instead of killing a healthy server.
            signal(SIGPIPE, SIG_IGN)
            let comm = open("/proc/self/comm", O_WRONLY)
            if comm >= 0 { _ = write(comm, "rawmount", 8); close(comm) }
        }
        let (imagePath, mp, target) = try checkedPaths(readOnly: s.readOnly)
        defer { close(target.fd) }
        let mode = target.mode
        let pidFile = try Paths.pidFile(forMountpoint: mp)
        let errorFile = try Paths.closeErrorFile(forMountpoint: mp)
        let notify = readyFd
        // Notes reach the user's terminal even when the server has detached.
        let note: @Sendable (String) -> Void = { text in
            if let fd = notify { _ = "note: \(text.escapingControls)\n".withCString { write(fd, $0, strlen($0)) } } else { printError("rawmount: " + text) }
        }
        let (device, ro) = try openDevice(s, imagePath: imagePath, note: note)
        // Named as the user named the image (a symlink shows under its own name).
        let file = ExposedFile(name: Paths.rawName(forImage: image), device: device, readOnly: ro)
        let serverLog: ServerLog?
        do {
            // A foreground server tells its terminal; a detached one has none, so syslog with -v.
            serverLog = s.log != nil || foreground || verbose
                ? try ServerLog(path: s.log, toStandardError: foreground, toSyslog: verbose && !foreground) : nil
        } catch {
            try? device.close()
            throw error
        }
        let files = mode == S_IFDIR ? exposedFiles(file, s, note: note, log: serverLog) : [file]
        let fs = FuseFilesystem(files: files, rootIsFile: mode == S_IFREG, log: serverLog,
                                ownership: .init(uid: s.uid, gid: s.gid, umask: s.umask))
        let mount: FuseMount
        do {
            if Self.testPauseBeforeMount > 0 { usleep(Self.testPauseBeforeMount) }
            mount = try FuseMount(filesystem: fs, mountpoint: mp, target: target.mountTarget, fsName: imagePath, readOnly: ro,
                                  extraOptions: s.fuseOptions)
        } catch {
            try? device.close()
            throw error
        }
        unlink(errorFile)
        let overlayFile = try Paths.overlayFile(forMountpoint: mp)
        if let overlay = s.overlay { Paths.writeFile(overlayFile, (try? Paths.asNamed(overlay)) ?? overlay) } else { unlink(overlayFile) }
        Paths.writeFile(pidFile, "\(getpid())\n")
        announce(mode == S_IFREG ? [mp] : files.map { mp + "/" + $0.name }, imagePath: imagePath)
        let writeBack = PeriodicWriteBack(fs.writeBackTargets, onError: { name, error in
            serverLog?.record("periodic write-back of \(name): \(error)")
        })
        _ = mount.run()
        // Where the mounted directory is now, by its descriptor: the checked path may have
        // been renamed or replaced by a symlink meanwhile (UMOUNT_NOFOLLOW refuses a link).
        if let now = target.currentPath { mount.mountpoint = now }
        mount.unmount()
        writeBack.stop()
        let closed = closeImage(file, imagePath: imagePath, log: serverLog, errorFile: errorFile)
        unlink(pidFile)
        unlink(overlayFile)
        if !closed { throw ExitCode.failure }
    }

    /// The image path as named and the mountpoint, resolved once and opened as a
    /// descriptor (kept open until the mount is made), with every check on them.
    /// `readOnly`: an image may then be shown over its own file (as qemu-storage-daemon
    /// allows): it is opened before the mount hides it, and nothing reopens it by name.
    private func checkedPaths(readOnly: Bool) throws -> (imagePath: String, mountpoint: String, target: Paths.Mountpoint) {
        // The image as named (absolute, its directory resolved, a symlink at the end kept):
        // backing files, Bochs layers and VDI parents are found next to that name, as QEMU
        // and Bochs find them. The fully resolved path only guards against mounting on itself.
        let imagePath: String, realImage: String, mp: String
        do {
            realImage = try Paths.realPath(image)
            imagePath = try Paths.asNamed(image)
        } catch let e as BlockError {
            throw BlockError.usage("\(image): cannot open the image: \(String(cString: strerror(e.errnoValue)))")
        }
        do { mp = try Paths.realPath(mountpoint) } catch let e as BlockError {
            let hint = e.errnoValue == ENOENT ? " (create the directory first, e.g. mkdir -p \(mountpoint))" : ""
            throw BlockError.usage("mountpoint \(mountpoint): \(String(cString: strerror(e.errnoValue)))\(hint)")
        }
        // From here on the mountpoint is this descriptor (kept open until the mount is made).
        let target = try Paths.Mountpoint.open(resolved: mp, named: mountpoint)
        let mode = target.mode
        guard mode == S_IFDIR || mode == S_IFREG else {
            throw BlockError.usage("\(mountpoint): mountpoint must be a directory or a regular file")
        }
        if mp == realImage || (try? ImageFile(path: realImage, writable: false))?.identity.map({ ($0.device, $0.inode) == target.identity }) == true {
            // Writable, its own writes would go through the view that hides it: only read-only.
            guard readOnly, mode == S_IFREG else {
                throw BlockError.usage("\(mountpoint): an image can be shown over its own file only read-only (-r)")
            }
        }
        if let why = Paths.unsuitableMountpoint(mp) {
            throw BlockError.usage("mountpoint \(mountpoint): refused: \(why)")
        }
        // Stacked mounts would share one pid file, and `unmount` could no longer wait for both.
        if let other = MountTable.image(mountedAt: mp) {
            throw BlockError.usage("mountpoint \(mountpoint): already shows \(other); run `rawmount unmount \(mountpoint)` first")
        }
        return (imagePath, mp, target)
    }

    /// Opens the image (or the overlay over it) as asked; the second value says whether it
    /// is served read-only (asked, a snapshot, or an image that cannot be written here).
    private func openDevice(_ s: MountSettings, imagePath: String, note: @escaping @Sendable (String) -> Void) throws -> (BlockDevice, Bool) {
        let fmt = s.format.flatMap { ImageFormat(rawValue: $0.lowercased()) }
        var openPath = imagePath, openFormat = fmt
        if let overlay = s.overlay {
            let cluster = try parseSize(s.overlayClusterSize)
            guard cluster >= 512, cluster <= 2 << 20, cluster & (cluster - 1) == 0 else {
                throw BlockError.usage("--overlay-cluster-size \(s.overlayClusterSize): a power of two from 512 to 2M")
            }
            if let created = try Overlay.prepare(overlay: overlay, evidence: imagePath, format: fmt, clusterSize: cluster) { note(created) }
            openPath = try Paths.asNamed(overlay)
            openFormat = .qcow2
        }
        let device: BlockDevice
        do {
            device = try ImageOpener.open(path: openPath, options: .init(writable: !s.readOnly && s.snapshot == nil, format: openFormat, lock: !s.forceShare,
                                                                         snapshot: s.snapshot, onNote: note))
            // The overlay's backing must still be the evidence named (not a file swapped in since).
            if let overlay = s.overlay, device.backing?.driver.file.identity != (try? ImageFile(path: imagePath, writable: false))?.identity {
                try? device.close()
                throw BlockError.usage("--overlay \(overlay): its backing file is no longer \(imagePath)")
            }
        } catch let e as BlockError {
            // Evidence on a read-only medium, or someone else's file: say how to read it anyway.
            if case let .io(_, _, _, err) = e, err == EROFS || err == EACCES, !s.readOnly {
                throw BlockError.usage("\(e.description); to read it without writing, mount with --read-only (-r)")
            }
            throw e
        }
        var ro = s.readOnly || s.snapshot != nil
        if !ro && !device.isWritable {
            let why = device.driver.readOnlyReason ?? "its file is read-only"
            note("\(image): this \(device.driver.info.format) image cannot be written here (\(why)); mounting read-only")
            ro = true
        }
        return (device, ro)
    }

    /// The disk file, its partitions (as read at mount time; a table changed through the
    /// disk file shows after a remount) and a read-only file per consistent dirty bitmap.
    private func exposedFiles(_ file: ExposedFile, _ s: MountSettings, note: @Sendable (String) -> Void, log serverLog: ServerLog?) -> [ExposedFile] {
        let device = file.device
        var files = [file]
        if !s.noPartitions {
            let table = PartitionTable.read(device)
            for n in table.notes {
                note("\(image): partition table: \(n)")
                serverLog?.record("partition table: \(n)")
            }
            for p in table.partitions {
                files.append(ExposedFile(name: Paths.partitionName(forImage: image, index: p.index), partitionOf: file,
                                         start: p.start, length: p.length))
            }
        }
        for (i, b) in device.driver.dirtyBitmaps.enumerated() {
            let bits = b.bits
            files.append(ExposedFile(name: Paths.dirtyViewName(forImage: image, bitmap: b.name, index: i),
                                     view: DirtyBitmapView.device(over: device, bits: bits, name: b.name), of: file,
                                     dataBytes: { bits.dirtyBytes }))
        }
        return files
    }

    /// Tells the waiting parent (or the terminal) which files are served.
    private func announce(_ shown: [String], imagePath: String) {
        if let fd = readyFd {
            // From here on nothing reaches the user's terminal: libfuse's stderr was the pipe.
            let devNull = open("/dev/null", O_WRONLY)
            if devNull >= 0 { dup2(devNull, 2); close(devNull) }
            let message = shown.map { "file: \($0.escapingControls)\n" }.joined() + "ok\n"
            _ = message.withCString { write(fd, $0, strlen($0)) }
            close(fd)
        } else if !quiet {
            print("serving \(imagePath) at \(shown[0])")
            for extra in shown.dropFirst() { print("  also \(extra)") }
            fflush(nil)
        }
    }

    /// After the unmount: held writes applied, the image closed; what failed is logged,
    /// printed and left for `unmount` (which waits for this process) in `errorFile`; false then.
    private func closeImage(_ file: ExposedFile, imagePath: String, log serverLog: ServerLog?, errorFile: String) -> Bool {
        let device = file.device
        var problems: [String] = []
        // Name the image unless the error already names the file it is about.
        func problem(_ doing: String, _ error: Error) -> String {
            (error as? BlockError)?.file != nil ? "\(doing) \(describe(error))" : "\(doing) \(imagePath): \(describe(error))"
        }
        do { try file.writeBehind?.settle() } catch { problems.append(problem("writing", error)) }
        do { try device.close() } catch { problems.append(problem("closing", error)) }
        keepUntilExit(device)
        for p in problems {
            serverLog?.record(p)
            printError("rawmount: " + p)
        }
        // A detached server has no terminal: `unmount`, which waits for this process, says it.
        if !problems.isEmpty { Paths.writeFile(errorFile, problems.joined(separator: "\n") + "\n") }
        return problems.isEmpty
    }
}

/// Detaching: re-run ourselves in a new session with --ready-fd and wait until the child
/// says the raw file is ready (or why it is not).
enum Detach {
    /// The child reports on the pipe, one line each: `note: ...`, `file: PATH`, then `ok` or
    /// `error: ...`. Its stderr is the same pipe until the mount is up, so what libfuse and
    /// fusermount3 say when they refuse (allow_other without user_allow_other, an unknown -o
    /// option, a mountpoint the user cannot write) reaches the user as they said it.
    static func spawnAndWait(arguments: [String], quiet: Bool) -> Int32 {
        var fds: [Int32] = [0, 0]
        guard pipe(&fds) == 0 else { printError("rawmount: pipe: \(String(cString: strerror(errno)))"); return 1 }
        let (readEnd, writeEnd) = (fds[0], fds[1])
        _ = fcntl(readEnd, F_SETFD, FD_CLOEXEC)
        closeInheritedDescriptors(except: writeEnd)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, writeEnd, 2)
        var attr = posix_spawnattr_t()
        posix_spawnattr_init(&attr)
        defer { posix_spawnattr_destroy(&attr) }
        posix_spawnattr_setflags(&attr, Int16(0x80)) // POSIX_SPAWN_SETSID

        // Before a `--` (after it every word is an operand, `rawmount mount -- -x.qcow2 DIR`).
        var argv = ["rawmount"] + arguments
        argv.insert(contentsOf: ["--ready-fd", String(writeEnd)], at: argv.firstIndex(of: "--") ?? argv.endIndex)
        var cargs: [UnsafeMutablePointer<CChar>?] = argv.map { strdup($0) } + [nil]
        defer { for p in cargs { free(p) } }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, "/proc/self/exe", &actions, &attr, &cargs, environ)
        close(writeEnd)
        guard rc == 0 else { printError("rawmount: cannot start server: \(String(cString: strerror(rc)))"); return 1 }

        // Line by line, stopping at the verdict: a helper that outlives the mount (fusermount3
        // -o auto_unmount) may keep the pipe open.
        var pending = [UInt8]()
        var buf = [UInt8](repeating: 0, count: 4096)
        var verdict: String?
        var files: [String] = []
        reading: while verdict == nil {
            while let nl = pending.firstIndex(of: 0x0A) {
                let line = String(decoding: pending[..<nl], as: UTF8.self)
                pending.removeSubrange(...nl)
                if line.hasPrefix("note: ") { printError("rawmount: " + line.dropFirst(6)) }
                else if line.hasPrefix("file: ") { files.append(String(line.dropFirst(6))) }
                else if line == "ok" || line.hasPrefix("error: ") { verdict = line; break reading }
                else if !line.isEmpty { printError(line) }
            }
            let n = read(readEnd, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            pending += buf[0..<n]
        }
        close(readEnd)
        if verdict == nil, !pending.isEmpty { printError(String(decoding: pending, as: UTF8.self)) }
        if verdict == "ok" {
            if !quiet { for f in files { print(f) } }
            return 0
        }
        var status: Int32 = 0
        _ = waitpid(pid, &status, 0)
        if let verdict, verdict.hasPrefix("error: ") {
            printError("rawmount: " + verdict.dropFirst(7))
        } else {
            printError("rawmount: the server exited before the mount was ready (status \(status))")
        }
        return 1
    }
}

/// Marks every descriptor above stderr close-on-exec, so the detached server does not hold
/// our caller's pipes or sockets open (a caller waiting for EOF would wait forever).
private func closeInheritedDescriptors(except keep: Int32) {
    guard let dir = opendir("/proc/self/fd") else { return }
    defer { closedir(dir) }
    var fds: [Int32] = []
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if let fd = Int32(name), fd > 2, fd != keep { fds.append(fd) }
    }
    for fd in fds { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
}
