# Flatten a JSON document into "PATH<TAB>VALUE" lines, e.g. ".os.sshKeys[0]<TAB>ssh-ed25519 ..."
# for every scalar (strings unescaped for \" \\ \/; true/false/null/numbers as written).
# jq starts in about a second under emulation; boot-time reads of config.json use this instead.
BEGIN { RS = "\001"; d = 0; wantkey = 0 }
function path(   j, p) {
    p = ""
    for (j = 1; j <= d; j++) p = p (type[j] == "o" ? "." key[j] : "[" idx[j] "]")
    return p
}
function unescape(s) {
    s = substr(s, 2, length(s) - 2)
    gsub(/\\\//, "/", s); gsub(/\\"/, "\"", s); gsub(/\\\\/, "\\", s)
    return s
}
{
    s = $0
    while (length(s) > 0) {
        if (match(s, /^[ \t\r\n,:]+/)) {
            t = substr(s, 1, RLENGTH)
            if (index(t, ",")) { if (type[d] == "a") idx[d]++; else wantkey = 1 }
            s = substr(s, RLENGTH + 1); continue
        }
        c = substr(s, 1, 1)
        if (c == "{") { d++; type[d] = "o"; key[d] = ""; wantkey = 1; s = substr(s, 2); continue }
        if (c == "[") { d++; type[d] = "a"; idx[d] = 0; wantkey = 0; s = substr(s, 2); continue }
        if (c == "}" || c == "]") { d--; wantkey = 0; s = substr(s, 2); continue }
        if (match(s, /^"([^"\\]|\\.)*"/)) {
            v = unescape(substr(s, 1, RLENGTH)); s = substr(s, RLENGTH + 1)
            if (type[d] == "o" && wantkey) { key[d] = v; wantkey = 0 }
            else printf "%s\t%s\n", path(), v
            continue
        }
        if (match(s, /^[-+.0-9a-zA-Z]+/)) {
            printf "%s\t%s\n", path(), substr(s, 1, RLENGTH); s = substr(s, RLENGTH + 1)
            continue
        }
        exit 1  # not JSON
    }
}
