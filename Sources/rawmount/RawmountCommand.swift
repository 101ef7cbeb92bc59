import ArgumentParser
#if canImport(Glibc)
import Glibc
#endif

@main
struct Rawmount: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rawmount",
        abstract: "Show virtual-disk images as plain raw block files through FUSE.",
        discussion: "Reads and writes raw, qcow2, QED, VDI, VMDK, VHD (vpc) and VHDX; reads qcow2 internal snapshots and Bochs images." + Examples.overview,
        version: "0.5.0",
        // mount.fuse3 (mount -t fuse.rawmount, fstab) runs `rawmount IMAGE DIR -o OPTS`.
        subcommands: [MountCommand.self, UnmountCommand.self, ListCommand.self, InfoCommand.self, CreateCommand.self, CheckCommand.self, BitmapCommand.self, HashCommand.self, VerifyCommand.self, BackupCommand.self, CompareCommand.self, RebaseCommand.self, CommitCommand.self, ResizeCommand.self, SnapshotCommand.self, MeasureCommand.self, MapCommand.self, ConvertCommand.self, ServeCommand.self],
        defaultSubcommand: MountCommand.self)

    /// Swift's arguments replace bytes that are not UTF-8, so such a file name would be opened
    /// as a different name: say so instead.
    static func main() {
        // With mount as the default verb, a bare `rawmount` would complain about a missing
        // IMAGE: show the overview instead.
        if CommandLine.argc == 1 { print(helpMessage()); Glibc.exit(0) }
        for i in 1..<Int(CommandLine.argc) {
            guard let raw = CommandLine.unsafeArgv[i], String(validatingCString: raw) == nil else { continue }
            var shown = ""
            for byte in UnsafeBufferPointer(start: UnsafeRawPointer(raw).assumingMemoryBound(to: UInt8.self), count: strlen(raw)) {
                shown += (0x20..<0x7F).contains(byte) ? String(UnicodeScalar(byte)) : "\\x" + String(byte, radix: 16)
            }
            printError("rawmount: argument '\(shown)' is not valid UTF-8; rawmount needs UTF-8 file names (rename the file or make a symlink to it)")
            Glibc.exit(1)
        }
        if let hint = mistypedVerb() {
            printError("rawmount: unknown verb '\(hint.typed)' (and no such file); did you mean '\(hint.verb)'? (rawmount --help lists the verbs)")
            Glibc.exit(1)
        }
        // Deep backing chains hold one descriptor per image: allow as many as the system lets us.
        var limit = rlimit()
        let nofile = __rlimit_resource_t(RLIMIT_NOFILE.rawValue)
        if getrlimit(nofile, &limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max
            _ = setrlimit(nofile, &limit)
        }
        Self.main(argumentsWithStoredVerify())
    }

    /// `hash --verify` without a digest after it (the next word is the image) checks against
    /// the digests the image stores: rewritten as `--verify=stored`, which ArgumentParser takes.
    static func argumentsWithStoredVerify() -> [String] {
        var args = Array(CommandLine.arguments.dropFirst())
        guard args.first == "hash", let i = args.firstIndex(of: "--verify") else { return args }
        if i + 1 == args.count || !(args[i + 1].allSatisfy(\.isHexDigit) && !args[i + 1].isEmpty) { args[i] = "--verify=stored" }
        return args
    }
}

extension Rawmount {
    /// With `mount` as the default verb, a mistyped verb (`rawmount umount /mnt/x`) would be
    /// taken for an image path: when the first word is no file and is within two edits of a
    /// verb, the verb is suggested instead.
    static func mistypedVerb() -> (typed: String, verb: String)? {
        guard CommandLine.argc > 1, let first = CommandLine.unsafeArgv[1].map({ String(cString: $0) }),
              !first.hasPrefix("-"), !first.contains("/"), access(first, F_OK) != 0 else { return nil }
        let verbs = configuration.subcommands.map { $0.configuration.commandName ?? "" }
        guard !verbs.contains(first) else { return nil }
        if first == "umount" { return (first, "unmount") }  // the Unix command's name
        let best = verbs.map { ($0, editDistance(first.lowercased(), $0)) }.min { $0.1 < $1.1 }
        guard let (verb, d) = best, d <= 2, d < verb.count else { return nil }
        return (first, verb)
    }

    /// Levenshtein distance (insertions, deletions, substitutions).
    static func editDistance(_ a: String, _ b: String) -> Int {
        let x = Array(a.unicodeScalars), y = Array(b.unicodeScalars)
        guard !x.isEmpty else { return y.count }
        var row = Array(0...y.count)
        for i in 1...x.count {
            var previous = row[0]
            row[0] = i
            for j in stride(from: 1, through: y.count, by: 1) {
                let current = row[j]
                row[j] = min(row[j] + 1, row[j - 1] + 1, previous + (x[i - 1] == y[j - 1] ? 0 : 1))
                previous = current
            }
        }
        return row[y.count]
    }
}
