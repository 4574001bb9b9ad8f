-- The gateway's request rules that Envoy's built-in filters cannot express (envoy.filters.http.lua in
-- gateway/envoy.yaml, after CORS and before gRPC-Web and the transcoder, so it sees the client's own
-- method, path and content type):
--   * x-request-id: a client's id is kept when well formed (1 to 128 letters, digits and -_.:, the
--     rule the server applies too), otherwise replaced by a new random one;
--   * the access log gets the client's method and a log-safe query (emails masked, page tokens
--     truncated, every other value dropped) as dynamic metadata;
--   * refusals, answered as google.rpc.Status JSON with an ErrorInfo reason:
--       - native gRPC (application/grpc) over HTTP/1.x: gRPC needs HTTP/2 (400 GRPC_REQUIRES_HTTP2);
--       - a POST to a REST path (the `rest` route of gateway/envoy.yaml) that also has a query
--         string: credentials and tokens belong in the body, never in a URL that proxies and logs
--         keep (400 QUERY_PARAMETERS_NOT_ALLOWED);
--       - a REST body that is not JSON: text/plain, form and multipart bodies are what a cross-site
--         form can post without a CORS preflight (415 UNSUPPORTED_MEDIA_TYPE).

local METADATA = "referral.gateway"
-- Set on a request this filter refuses: local_reply_config then leaves the JSON body as written here.
local REPLY_MARKER = "x-referral-gateway-reply"
local REQUEST_ID_PATTERN = "^[A-Za-z0-9._:-]+$"
local MAX_REQUEST_ID = 128
local PAGE_TOKEN_SHOWN = 8

-- Request ids identify, they protect nothing: Lua's generator, seeded once per worker from the kernel.
do
  local seed = os.time()
  local urandom = io.open("/dev/urandom", "rb")
  if urandom then
    local bytes = urandom:read(4)
    urandom:close()
    seed = 0
    for i = 1, #bytes do
      seed = seed * 256 + bytes:byte(i)
    end
  end
  math.randomseed(seed)
end

local function new_request_id()
  local hex = {}
  for i = 1, 32 do
    hex[i] = string.format("%x", math.random(0, 15))
  end
  local id = table.concat(hex)
  return string.format("%s-%s-4%s-%s-%s", id:sub(1, 8), id:sub(9, 12), id:sub(14, 16), id:sub(17, 20), id:sub(21, 32))
end

local function valid_request_id(value)
  return value ~= nil and #value <= MAX_REQUEST_ID and value:match(REQUEST_ID_PATTERN) ~= nil
end

local function masked_email(value)
  local first, domain = value:match("^([^@%%])[^@]*@(.+)$")
  if not first then
    first, domain = value:match("^([^@%%])[^@]*%%40(.+)$")
  end
  if not first then
    return "[redacted]"
  end
  return first .. "***@" .. domain
end

local function safe_value(key, value)
  if key == "email" then
    return masked_email(value)
  elseif key == "page_token" then
    if #value <= PAGE_TOKEN_SHOWN then
      return value
    end
    return value:sub(1, PAGE_TOKEN_SHOWN) .. "..."
  elseif key == "page_size" and value:match("^%d+$") and #value <= 9 then
    return value
  end
  return "[redacted]"
end

-- "?email=a***@example.com&page_token=AbCdEfGh..." or "" without a query: names are kept when short
-- and plain, values only as safe_value allows.
local function safe_query(query)
  if query == nil or query == "" then
    return ""
  end
  local parts = {}
  for pair in query:gmatch("[^&]+") do
    local key, value = pair:match("^([^=]*)=?(.*)$")
    if #key > 32 or not key:match("^[%w_.]*$") then
      key = "[redacted]"
    end
    parts[#parts + 1] = key .. "=" .. safe_value(key, value)
    if #parts >= 10 then
      parts[#parts + 1] = "..."
      break
    end
  end
  return "?" .. table.concat(parts, "&")
end

local function refuse(handle, status, code, reason, message)
  handle:headers():replace(REPLY_MARKER, "1")
  local body = string.format(
    '{"code":%d,"message":"%s","details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo",'
      .. '"reason":"%s","domain":"referral.v1","metadata":{}}]}',
    code, message, reason)
  -- Envoy shapes its answer to a request it took for gRPC (by content type, before any filter ran) as
  -- gRPC; the first Lua filter of gateway/envoy.yaml turns this one back into HTTP from this copy.
  handle:streamInfo():dynamicMetadata():set(METADATA, "refusal", tostring(status) .. " " .. body)
  handle:respond({[":status"] = tostring(status), ["content-type"] = "application/json"}, body)
end

local function is_json(content_type)
  local media = content_type:lower():match("^%s*([^;%s]+)")
  return media == "application/json" or (media ~= nil and media:match("^application/[%w.-]+%+json$") ~= nil)
end

-- gRPC metadata keys are [0-9a-z_.-] only: a REST header named otherwise (legal in HTTP, e.g.
-- "x!y") would make the server's gRPC core refuse the whole call with INTERNAL (500). Such headers
-- mean nothing to the API, so they are dropped before the call is made.
local function drop_headers_grpc_cannot_carry(headers)
  local dropped = {}
  for key, _ in pairs(headers) do
    if not key:match("^:?[0-9a-z_.%-]+$") then dropped[#dropped + 1] = key end
  end
  for _, key in ipairs(dropped) do headers:remove(key) end
end

function envoy_on_request(handle)
  local headers = handle:headers()
  headers:remove(REPLY_MARKER)
  drop_headers_grpc_cannot_carry(headers)
  if not valid_request_id(headers:get("x-request-id")) then
    headers:replace("x-request-id", new_request_id())
  end

  local method = headers:get(":method") or "-"
  local path = headers:get(":path") or ""
  local query = path:match("%?(.*)$") or ""
  local metadata = handle:streamInfo():dynamicMetadata()
  metadata:set(METADATA, "method", method)
  metadata:set(METADATA, "query", safe_query(query))

  local content_type = headers:get("content-type") or ""
  local grpc = content_type:match("^application/grpc") ~= nil
  local grpc_web = content_type:match("^application/grpc%-web") ~= nil
  if grpc_web then
    -- The route was chosen (by CORS) while this was still gRPC-Web; choose again once the gRPC-Web
    -- filter has made it gRPC, so that it takes its RPC's route (rate limits, retries) like gRPC.
    handle:clearRouteCache()
    return
  end
  if grpc then
    if handle:streamInfo():protocol():match("^HTTP/1") then
      refuse(handle, 400, 3, "GRPC_REQUIRES_HTTP2",
        "gRPC needs HTTP/2; use a gRPC client, gRPC-Web, or the REST path with JSON")
    end
    return
  end
  if method ~= "POST" or handle:metadata():get("rest_call") ~= true then
    return
  end
  if query ~= "" then
    refuse(handle, 400, 3, "QUERY_PARAMETERS_NOT_ALLOWED",
      "this call takes its fields in the JSON body only; send no query string")
  elseif content_type ~= "" and not is_json(content_type) then
    refuse(handle, 415, 3, "UNSUPPORTED_MEDIA_TYPE", "the request body must be JSON (application/json)")
  end
end
