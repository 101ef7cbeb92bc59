import BlockEngine
#if canImport(Glibc)
import Glibc
#endif

/// What a mount was asked for, from its flags and its `-o` list together: mount(8) and
/// mount.fuse3 can only pass `-o`, so every rawmount option has an `-o key=value` spelling.
struct MountSettings {
    var readOnly = false
    /// `-r`/`--read-only` given as a flag: an `-o rw` after it is a contradiction.
    var readOnlyFlag = false
    var forceShare = false
    var format: String?
    var snapshot: String?
    var overlay: String?
    var overlayClusterSize = "64K"
    var log: String?
    var noPartitions = false
    var uid: uid_t?
    var gid: gid_t?
    var umask: mode_t?
    /// Passed on to libfuse, which knows them (or refuses them with its own message).
    var fuseOptions: [String] = []

    /// Options mount(8) and fstab add that mean nothing to a FUSE server (mount.fuse3 drops
    /// some of them, but `rawmount IMAGE DIR -o ...` can be run by hand with the same line).
    /// The access-time variants libfuse does not take are ignored too: the raw file's times
    /// are the image's, whatever the mount asks.
    static let ignored: Set<String> = ["defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
                                       "nofail", "_netdev", "loud", "silent",
                                       "relatime", "norelatime", "strictatime", "nostrictatime", "lazytime", "nolazytime",
                                       "diratime", "nodiratime", "iversion", "noiversion"]

    /// Splits `a,b="c,d",e` on the commas outside double quotes (libmount's quoting), and
    /// drops the quotes.
    static func split(_ list: String) -> [String] {
        var out: [String] = [], cur = "", quoted = false
        for ch in list {
            if ch == "\"" { quoted.toggle(); continue }
            if ch == "," && !quoted { out.append(cur); cur = ""; continue }
            cur.append(ch)
        }
        out.append(cur)
        return out.filter { !$0.isEmpty }
    }

    /// Applies one `-o` list over the flags. A rawmount option given both ways with
    /// different values is refused rather than silently picking one.
    mutating func apply(optionList list: String) throws {
        for item in Self.split(list) {
            let key: String, value: String?
            if let eq = item.firstIndex(of: "=") {
                key = String(item[..<eq]); value = String(item[item.index(after: eq)...])
            } else {
                key = item; value = nil
            }
            func needValue() throws -> String {
                guard let value, !value.isEmpty else { throw BlockError.usage("-o \(key): needs a value (\(key)=...)") }
                return value
            }
            func set(_ field: inout String?, _ flag: String) throws {
                let v = try needValue()
                if let old = field, old != v { throw BlockError.usage("-o \(key)=\(v) contradicts \(flag) \(old)") }
                field = v
            }
            switch key.replacingUnderscores {
            // As mount(8): within the -o lists the last of ro and rw wins.
            case "ro": readOnly = true
            case "rw":
                if readOnlyFlag { throw BlockError.usage("-o rw contradicts --read-only (-r)") }
                readOnly = false
            case "force-share": forceShare = true
            case "no-partitions": noPartitions = true
            case "format": try set(&format, "--format")
            case "snapshot": try set(&snapshot, "--snapshot")
            case "overlay": try set(&overlay, "--overlay")
            case "log": try set(&log, "--log")
            case "overlay-cluster-size": overlayClusterSize = try needValue()
            case "uid": uid = try Self.userID(needValue())
            case "gid": gid = try Self.groupID(needValue())
            case "umask":
                guard let m = mode_t(try needValue(), radix: 8), m <= 0o777 else {
                    throw BlockError.usage("-o umask=\(value ?? ""): an octal mask such as 022 or 077")
                }
                umask = m
            // rawmount names its mounts (fsname = the image, type fuse.rawmount): list, unmount
            // and mount(8) find them by that, so another name would hide the mount from them.
            case "subtype" where value == "rawmount":
                continue  // (what it is anyway)
            case "fsname", "subtype":
                throw BlockError.usage("-o \(key): rawmount sets it itself (list and unmount find mounts by it)")
            default:
                if Self.ignored.contains(key) || key.hasPrefix("x-") || key == "comment" { continue }
                fuseOptions.append(item)
            }
        }
    }

    static func userID(_ text: String) throws -> uid_t {
        if let n = uid_t(text) { return n }
        guard let pw = getpwnam(text) else { throw BlockError.usage("-o uid=\(text): no such user") }
        return pw.pointee.pw_uid
    }

    static func groupID(_ text: String) throws -> gid_t {
        if let n = gid_t(text) { return n }
        guard let gr = getgrnam(text) else { throw BlockError.usage("-o gid=\(text): no such group") }
        return gr.pointee.gr_gid
    }
}

private extension String {
    /// `no_partitions` and `no-partitions` are one option (fstab writers use both).
    var replacingUnderscores: String { self.hasPrefix("_") ? self : String(self.map { $0 == "_" ? "-" : $0 }) }
}
