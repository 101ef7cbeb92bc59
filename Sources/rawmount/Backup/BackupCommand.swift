import ArgumentParser
import BlockEngine
import ImageFormats
#if canImport(Glibc)
import Glibc
#endif

/// `rawmount backup`: full and incremental backups of a qcow2 image from its persistent
/// dirty bitmap, offline, in one command; restore and verify of the chain.
struct BackupCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "backup",
        abstract: "Back up a qcow2 image into a folder: full the first time, then incremental from a persistent dirty bitmap.",
        discussion: """
            The first run writes DIR/<stem>.full.<time>.qcow2 and adds (or resets) the bitmap; every later run writes \
            DIR/<stem>.inc.<time>.qcow2, backed by the previous file, holding exactly the clusters the bitmap marks dirty \
            (data as data, dirty ranges that now read as zeros as zero clusters), then resets the bitmap. DIR/<stem>.backup.json \
            lists the chain. The image must not be in use (the run takes its write lock). Safe order: the new file is complete \
            and durable (written under a temporary name, synced, renamed) and the manifest updated before the bitmap is reset, \
            so a crash leaves either the old state (the next run makes the same backup again) or the new one; a bitmap the \
            reset left inconsistent makes the next run a full backup. Restore a point with --restore FILE OUT (or convert \
            the file: its backing chain is the rest); check a chain with --verify. One folder per bitmap: two chains that \
            reset the same bitmap would each miss what the other copied.
            """ + Examples.section("backup"))

    @Option(help: "The persistent dirty bitmap that records changes between backups (added by the first run).")
    var bitmap = "rawmount-backup"

    @Flag(help: "Take a full backup even when an incremental one is possible (starts a new chain).")
    var full = false

    @Flag(help: "Print what would be copied (bytes and extents) and change nothing.")
    var dryRun = false

    @Flag(help: "Record the disk's SHA-256 in the manifest (one more read of the disk), so --verify can check a restore against it.")
    var hash = false

    @Flag(help: "Restore: --restore FILE OUT writes the disk as it was at FILE's backup to OUT (-O picks the format).")
    var restore = false

    @Flag(help: "Verify: --verify DIR|FILE checks a chain (every file there, each backed by the one before, every cluster readable, the recorded SHA-256 when there is one).")
    var verify = false

    @Option(name: .customShort("O"), help: "Restore's output format (default raw).", completion: .list(CreateCommand.creatable))
    var outputFormat = "raw"

    @Flag(help: "Print JSON for scripts.")
    var json = false

    @Argument(help: "IMAGE DIR (backup), FILE OUT (--restore) or DIR|FILE (--verify).", completion: .file())
    var paths: [String]

    func validate() throws {
        let want = verify ? 1 : 2
        guard !(restore && verify) else { throw ValidationError("--restore and --verify are separate uses") }
        guard paths.count == want else {
            throw ValidationError(verify ? "--verify takes one path (a backup folder or file)" : restore ? "--restore takes FILE OUT" : "backup takes IMAGE DIR")
        }
    }

    func run() throws {
        do {
            if restore { return try restorePoint() }
            if verify { return try BackupVerify(path: paths[0], json: json).run() }
            try backup()
        } catch let e as ExitCode { throw e } catch {
            printError("rawmount: \(describe(error, forceShare: false))")
            throw ExitCode(2)
        }
    }

    private func backup() throws {
        let (image, folder) = (paths[0], paths[1])
        var st = stat()
        guard stat(folder, &st) == 0, st.st_mode & S_IFMT == S_IFDIR else {
            throw BlockError.usage("\(folder): not a folder (create it first)")
        }
        let began = monotonicSeconds()
        var run = BackupRun(image: image, folder: folder, bitmap: bitmap)
        run.forceFull = full
        run.recordHash = hash
        var bar: Progress?
        let result = try run.run(dryRun: dryRun) { read, total in
            if bar == nil { bar = Progress(total: total, enabled: isatty(STDERR_FILENO) == 1 && !json) }
            bar?.show(read)
        }
        bar?.finish()
        let seconds = monotonicSeconds() - began
        if json {
            var out: [String: Any] = ["image": image, "folder": folder, "bitmap": bitmap, "kind": result.kind, "dry-run": dryRun,
                                      "bytes-to-copy": result.bytesToCopy, "bytes-to-zero": result.bytesToZero,
                                      "extents": result.extents.count, "seconds": (seconds * 1000).rounded() / 1000]
            if let r = result.reason { out["full-because"] = r }
            if let f = result.file { out["file"] = f; out["bytes-written"] = result.copied.written; out["bytes-zeroed"] = result.copied.zeroed }
            if let h = result.sha256 { out["sha256"] = h }
            if dryRun { out["extent-list"] = result.extents.map { ["start": $0.offset, "length": $0.length, "data": $0.data] as [String: Any] } }
            print(QemuImageInfo.json(out))
            return
        }
        let what = "\(result.kind) backup" + (result.reason.map { " (\($0))" } ?? "")
        if dryRun {
            print("would take \(result.kind == "full" ? "a" : "an") \(what): \(result.bytesToCopy) bytes of data to copy, \(result.bytesToZero) bytes to mark zero, in \(result.extents.count) extent(s)")
            for e in result.extents { print("  \(e.offset)\t\(e.length)\t\(e.data ? "data" : "zero")") }
        } else {
            print("rawmount: \(image.escapingControls): \(what) in \((result.file ?? "").escapingControls): \(result.copied.written) bytes written, "
                + "\(result.copied.zeroed) zeroed, \(result.extents.count) extent(s), \(String(format1: seconds)) s")
        }
    }

    private func restorePoint() throws {
        let convert = try ConvertCommand.parse(["-O", outputFormat, paths[0], paths[1]])
        try convert.run()
    }
}
